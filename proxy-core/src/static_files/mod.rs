//! Static files. (Being written.)
