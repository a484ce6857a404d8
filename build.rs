//! Stamps the build with its git revision (`cruddur_syncd::version::REVISION`), shown by
//! `--version` and the `build_info` metric.
//!
//! Where it comes from, first match wins:
//! 1. `CRUDDUR_SYNCD_REVISION` in the build's environment (the Dockerfile passes its
//!    `REVISION` build argument this way: the image's build context has no `.git`);
//! 2. `git rev-parse --short=12 HEAD` (the commit; uncommitted changes are not marked, since
//!    cargo would not rerun this script when only a working-tree file changes);
//! 3. `unknown` (a source tarball, no git installed).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CRUDDUR_SYNCD_REVISION");
    let revision = match std::env::var("CRUDDUR_SYNCD_REVISION") {
        Ok(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ => from_git().unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=CRUDDUR_SYNCD_REVISION={revision}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| text.trim().to_string())
}

fn from_git() -> Option<String> {
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it names (a commit), and
    // packed-refs (a gc). Only files that exist: a missing one would rerun this every build.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = PathBuf::from(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(head)
}
