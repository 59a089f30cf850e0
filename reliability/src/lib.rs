//! Reliability checks that need no cluster (the chaos test on real processes lives in
//! `integration-tests`):
//!
//! - `simulation`: the deterministic simulation of the money protocols over seeded faults.
//! - `decoders`: what the platform does with bytes it did not make, as functions that must not
//!   panic whatever the bytes; the cargo-fuzz targets in `fuzz/` run them, and so do this
//!   crate's tests on every run of the suite.

pub mod decoders;
pub mod simulation;
