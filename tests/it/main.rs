//! The integration tests, one binary for all of them (one link of the dependency tree instead
//! of one per file): a module per area, the helpers they share in [`support`].
//!
//! Test names start with their module: `scripts/test faults::kill9` runs the tests whose name
//! contains that, `scripts/test -E 'test(/^faults::/)'` one whole area.

mod support;

mod api;
mod auth;
mod cache;
mod check;
mod config;
mod convergence;
mod deploy;
mod fanout;
mod faults;
mod fuzz_regressions;
mod model_props;
mod observability;
mod projector;
mod reconcile;
mod service;
mod stream_faults;
mod stream_moto;
mod tools;
