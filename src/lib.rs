//! cruddur-syncd: a cache-sync daemon and operator tools for Cruddur's messaging backend.
//!
//! Components and the way data flows between them:
//!
//! ```text
//!   config ──> every component (one file, env overrides, validated once)
//!
//!   DynamoDB ──(store: Query)──> cache <──(stream: decoded changes)── DynamoDB Streams
//!                                  │
//!   HTTP clients ──(http: JWT)─────┘        Cognito ──(reconcile)──> PostgreSQL users
//!
//!   DynamoDB Streams ──(projector: message INSERTs)──> DynamoDB group rows
//!                          └── lock + checkpoints ──> PostgreSQL
//! ```
//!
//! - [`config`]: the typed config and its validation.
//! - [`aws`]: the SDK clients; [`pg`]: bounded PostgreSQL connections.
//! - [`model`]: what an item of the single table means, decoded the same way from a Query and
//!   from a stream image.
//! - [`store`]: the DynamoDB reads and writes, paginated to the end.
//! - [`reconcile`]: Cognito `sub` -> `users.cognito_user_id`, set-based, one run at a time per
//!   database across a fleet (advisory lock), on a schedule inside the daemon.
//! - [`projector`]: moves conversation rows to the newest message from the stream, one instance
//!   per fleet (advisory lock), resuming from checkpoints in PostgreSQL.
//! - [`tools`]: the operator subcommands; [`check`]: the config and dependency report.
//! - [`daemon`]: the `run` command.

pub mod aws;
pub mod cache;
pub mod check;
pub(crate) mod cognito;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod dependency;
pub mod error;
pub mod fanout;
pub(crate) mod health;
pub mod heartbeat;
pub mod http;
pub(crate) mod lease;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod pg;
pub(crate) mod process_metrics;
pub mod projector;
pub mod reconcile;
pub mod reload;
pub(crate) mod retry;
pub mod store;
pub mod stream;
pub(crate) mod systemd;
pub mod tools;
pub mod version;

pub use error::{Error, Result};
