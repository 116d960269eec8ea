//! Response headers added per server and location. (Being written.)
