//! Per-client rate limits: nginx's `limit_req` and `limit_conn` as tower layers.
//!
//! (Being written.)

mod key;
mod rate;
mod zone;

pub mod conn;
pub mod req;

pub use conn::{LimitConnLayer, LimitConnStatus};
pub use key::Key;
pub use rate::{ParseRateError, Rate};
pub use req::{Decision, Delay, LimitReqLayer, LimitReqStatus, ReqLimit};
pub use zone::{ConnZone, ConnZoneBuilder, ReqZone, ReqZoneBuilder, DEFAULT_CAPACITY, ENTRY_BYTES};
