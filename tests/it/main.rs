//! The integration tests, one binary for all of them (one link of the dependency tree instead
//! of one per file): a module per area, the helpers they share in [`support`].
//!
//! Run one area, or one test, with a name filter: `scripts/test faults::`,
//! `scripts/test faults::kill9`.

mod support;

mod api;
mod auth;
mod check;
mod config;
mod convergence;
mod faults;
mod fuzz_regressions;
mod model_props;
mod projector;
mod reconcile;
mod service;
mod stream_faults;
mod stream_moto;
mod tools;
