//! Error pages. (Being written.)
