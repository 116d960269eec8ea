//! The server: listeners and connections. (Being written.)
