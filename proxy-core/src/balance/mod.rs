//! Upstream groups and load balancing. (Being written.)
