//! `docs/configuration.md` against the code, so the reference cannot drift: its table must list
//! exactly the keys `Config` accepts, each with the default `Config::default()` has, whether a
//! reload applies it (`reload::is_live`) and its environment variable. A failure prints the
//! rows the table should have.

use std::collections::BTreeMap;

use super::{Config, ENV_PREFIX};

const REFERENCE: &str = include_str!("../../docs/configuration.md");

/// One row of the reference table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    default: String,
    live: bool,
    env: String,
}

/// The rows of the table: `| `section.key` | default | live/restart | `ENV` | meaning |`.
fn documented() -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in REFERENCE.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split(" | ").map(str::trim).collect();
        if cells.len() < 5 || !cells[0].starts_with('`') || !cells[0][1..].contains('.') {
            continue;
        }
        let key = cells[0].trim_matches('`').to_string();
        let live = match cells[2] {
            "live" => true,
            "restart" => false,
            other => panic!("{key}: the third column is live or restart, not {other:?}"),
        };
        let row = Row { default: cells[1].to_string(), live, env: cells[3].trim_matches('`').to_string() };
        assert!(rows.insert(key.clone(), row).is_none(), "{key} is listed twice");
    }
    rows
}

/// The keys of every section as serde knows them: an unknown key's error lists the expected
/// ones ("unknown field `x`, expected one of `a`, `b`" or "expected `a`").
fn keys_in_code() -> Vec<String> {
    let mut out = Vec::new();
    for section in Config::SECTIONS {
        let probe = format!("[{section}]\nzz_not_a_key = 1\n");
        let err = toml::from_str::<Config>(&probe).expect_err("an unknown key is refused").to_string();
        let expected = err.split("expected").nth(1).unwrap_or_else(|| panic!("[{section}]: {err}"));
        let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(!fields.is_empty(), "[{section}]: no field names in {err:?}");
        out.extend(fields.iter().map(|f| format!("{section}.{f}")));
    }
    out
}

/// What the reference's default column says for `key`: the TOML value of `Config::default()`,
/// in backticks; keys without a value there (unset options, empty strings filled in at load)
/// are described in words, in parentheses.
fn default_of(defaults: &toml::Table, key: &str) -> Option<String> {
    let (section, name) = key.split_once('.')?;
    match defaults.get(section)?.get(name)? {
        toml::Value::String(s) if s.is_empty() => None,
        v => Some(format!("`{v}`")),
    }
}

fn expected_row(defaults: &toml::Table, key: &str) -> Row {
    let (section, name) = key.split_once('.').unwrap();
    Row {
        default: default_of(defaults, key).unwrap_or_else(|| "(...)".into()),
        live: crate::reload::is_live(key),
        env: format!("{ENV_PREFIX}{}__{}", section.to_ascii_uppercase(), name.to_ascii_uppercase()),
    }
}

#[test]
fn the_configuration_reference_lists_every_key_as_the_code_has_it() {
    let doc = documented();
    let code = keys_in_code();
    let defaults = match toml::Value::try_from(Config::default()).unwrap() {
        toml::Value::Table(t) => t,
        _ => unreachable!(),
    };
    let mut wrong = Vec::new();
    for key in &code {
        let want = expected_row(&defaults, key);
        let suggestion = format!(
            "| `{key}` | {} | {} | `{}` | ... |",
            want.default,
            if want.live { "live" } else { "restart" },
            want.env
        );
        match doc.get(key) {
            None => wrong.push(format!("missing: {suggestion}")),
            Some(row) => {
                let default_ok = match default_of(&defaults, key) {
                    Some(d) => row.default == d,
                    None => row.default.starts_with('(') && row.default.ends_with(')'),
                };
                if !default_ok || row.live != want.live || row.env != want.env {
                    wrong.push(format!("differs: {suggestion} (the reference has {row:?})"));
                }
            }
        }
    }
    for key in doc.keys().filter(|k| !code.contains(k)) {
        wrong.push(format!("not a key of the code: {key}"));
    }
    assert!(code.len() > 40, "only {} keys found: {code:?}", code.len());
    assert!(wrong.is_empty(), "docs/configuration.md and the code differ:\n{}", wrong.join("\n"));
}
