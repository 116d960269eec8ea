//! Criterion benchmarks of the proxy's hot paths (`benches/`) and the side-by-side load
//! comparison with nginx (`load/`). The guide below is `docs/performance.md`; its example
//! is compiled and run by the doc tests.
#![doc = include_str!("../../docs/performance.md")]
