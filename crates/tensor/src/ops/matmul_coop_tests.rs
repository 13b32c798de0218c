//! Tests of the cooperative-matrix kernel: detection for adapters this machine does not have,
//! what this machine's adapter reports, and the kernel against the f64 reference where the
//! adapter runs it.
