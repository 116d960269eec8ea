#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_core::forwarded::fuzz_forwarded(data));
