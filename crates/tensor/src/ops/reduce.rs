//! reduce: being written.
