//! Per-client rate limits (limit_req, limit_conn). (Being written.)
