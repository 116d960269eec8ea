//! Timeouts on bodies and connections. (Being written.)
