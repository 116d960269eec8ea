//! Forwarded headers and the real client address. (Being written.)
