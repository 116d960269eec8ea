#![no_main]
//! The binary's config value parsers (sizes such as "10M", durations such as "1h 30m"),
//! compiled from the binary's own source file so the fuzzed code is the shipped code.

#[allow(dead_code)]
#[path = "../../proxy-bin/src/config/values.rs"]
mod values;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = values::parse_size(text) {
        // A size that parses is exact: written back in bytes it parses to itself.
        assert_eq!(values::parse_size(&n.to_string()), Ok(n));
    }
    if let Ok(d) = values::parse_duration(text) {
        // Whole milliseconds, written back, parse to the same duration (or it is zero).
        if d.subsec_nanos() % 1_000_000 == 0 && d.as_millis() > 0 && d.as_secs() < 1 << 32 {
            let back = format!("{}ms", d.as_millis());
            assert_eq!(values::parse_duration(&back), Ok(d), "{text:?}");
        }
    }
});
