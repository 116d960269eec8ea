//! Request and response buffering. (Being written.)
