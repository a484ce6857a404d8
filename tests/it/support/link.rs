//! The `Link: <path>; rel="next"` header of a list route's pages, as a client follows it. One
//! parser for the tests ([`super::workload::ApiClient`]) and the soak (`examples/soak.rs`
//! includes this file with `#[path]`).

/// The path of a `Link: <path>; rel="next"` header, if any.
pub fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let v = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    v.strip_prefix('<')?.split_once(">; rel=\"next\"").map(|(u, _)| u.to_string())
}
