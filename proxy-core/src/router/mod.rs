//! The router: virtual servers and locations. (Being written.)
