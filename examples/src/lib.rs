//! Example programs live beside this crate (`examples/*.rs`); the pieces they share live
//! here so that tests run the very same code:
//!
//! - [`fastapi`]: the FastAPI deployment (TLS, redirect, static files, WebSockets, rate
//!   limit, `least_conn` over uvicorn processes), used by the `fastapi_proxy` example and
//!   its end-to-end test.
#![deny(missing_docs)]

pub mod fastapi;

/// The README's code blocks, compiled as doc tests so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
