#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_core::router::fuzz_route(data));
