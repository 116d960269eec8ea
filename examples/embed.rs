//! Embedding proxy-core: a placeholder until the server lands.
fn main() {}
