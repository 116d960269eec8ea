//! Arbitrary bytes as one HTTP/1.1 client connection through the whole proxy stack; see
//! `proxy_core::testing` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proxy_core::testing::http1_stack(data);
});
