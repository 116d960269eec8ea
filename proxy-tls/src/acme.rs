//! ACME (stub).
