//! What this build is: the package version and the git revision it was built from (`build.rs`;
//! "unknown" when built without git and without `CRUDDUR_SYNCD_REVISION`).

/// The package version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from, or "unknown".
pub const REVISION: &str = env!("CRUDDUR_SYNCD_REVISION");
/// What `--version` prints after the program name.
pub const LONG: &str = concat!(env!("CARGO_PKG_VERSION"), " (revision ", env!("CRUDDUR_SYNCD_REVISION"), ")");
