//! Example programs live beside this crate; see `examples/*.rs`.
