//! Allow/deny by client address. (Being written.)
