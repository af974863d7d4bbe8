//! The subset of containerd's filter syntax that snapshot listings use.
//!
//! A filter is a comma-separated list of clauses that must all match; a request's
//! filters match when any one of them does. A clause is `FIELD`, `FIELD==VALUE` or
//! `FIELD!=VALUE`, where FIELD is `name`, `parent`, `kind` or `labels.KEY`, and KEY or
//! VALUE may be double-quoted (with backslash escapes). containerd itself sends, after
//! a remote snapshotter answered `AlreadyExists`:
//! `labels."containerd.io/snapshot.ref"==sha256:…,parent=="…"`.
//! Regular-expression matches (`~=`) are refused with a clear error.

use crate::SnapshotterError;
use crate::store::SnapshotRecord;

/// One parsed filter: all clauses must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    clauses: Vec<Clause>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    field: Field,
    test: Test,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Present,
    Equals(String),
    NotEquals(String),
}

impl Filter {
    /// Parses one filter string.
    pub fn parse(text: &str) -> Result<Filter, SnapshotterError> {
        let invalid =
            |why: &str| SnapshotterError::InvalidArgument(format!("filter {text:?}: {why}"));
        let mut clauses = Vec::new();
        for raw in split_unquoted(text, ',').map_err(|why| invalid(&why))? {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            if find_unquoted(raw, "~=").is_some() {
                return Err(invalid("regular-expression matches (~=) are not supported"));
            }
            let (field_text, test) = match find_unquoted(raw, "==").or(find_unquoted(raw, "!=")) {
                Some(at) => {
                    let value = unquote(raw[at + 2..].trim()).map_err(|why| invalid(&why))?;
                    let test = if &raw[at..at + 2] == "==" {
                        Test::Equals(value)
                    } else {
                        Test::NotEquals(value)
                    };
                    (raw[..at].trim(), test)
                }
                None => (raw, Test::Present),
            };
            let field = match field_text {
                "name" => Field::Name,
                "parent" => Field::Parent,
                "kind" => Field::Kind,
                other => match other.strip_prefix("labels.") {
                    Some(key) => Field::Label(unquote(key).map_err(|why| invalid(&why))?),
                    None => return Err(invalid(&format!("unknown field {other:?}"))),
                },
            };
            clauses.push(Clause { field, test });
        }
        Ok(Filter { clauses })
    }

    /// True when every clause matches `record`.
    pub fn matches(&self, record: &SnapshotRecord) -> bool {
        self.clauses.iter().all(|clause| {
            let value = match &clause.field {
                Field::Name => Some(record.name.as_str()),
                Field::Parent => Some(record.parent.as_str()),
                Field::Kind => Some(record.kind.as_str()),
                Field::Label(key) => record.labels.get(key).map(String::as_str),
            };
            match (&clause.test, value) {
                (Test::Present, value) => value.is_some_and(|v| !v.is_empty()),
                (Test::Equals(expected), Some(value)) => value == expected,
                (Test::Equals(_), None) => false,
                (Test::NotEquals(expected), value) => value != Some(expected.as_str()),
            }
        })
    }
}

/// True when `record` matches any of `filters` (or `filters` is empty).
pub fn matches_any(filters: &[Filter], record: &SnapshotRecord) -> bool {
    filters.is_empty() || filters.iter().any(|filter| filter.matches(record))
}

/// Splits at `separator` outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            c if c == separator && !in_quotes => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err("unterminated quote".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// Byte offset of the first `needle` outside double quotes.
fn find_unquoted(text: &str, needle: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            _ if !in_quotes && text[i..].starts_with(needle) => return Some(i),
            _ => {}
        }
    }
    None
}

/// Removes surrounding double quotes and resolves `\"` and `\\`; bare text is kept as is.
fn unquote(text: &str) -> Result<String, String> {
    let Some(inner) = text.strip_prefix('"') else {
        return Ok(text.to_string());
    };
    let inner = inner
        .strip_suffix('"')
        .ok_or_else(|| format!("unterminated quote in {text:?}"))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(escaped) => out.push(escaped),
                None => return Err(format!("dangling backslash in {text:?}")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SnapshotKind;
    use std::collections::BTreeMap;

    fn record(name: &str, parent: &str, labels: &[(&str, &str)]) -> SnapshotRecord {
        SnapshotRecord {
            id: 1,
            name: name.into(),
            parent: parent.into(),
            kind: SnapshotKind::Committed,
            created_unix_nanos: 0,
            updated_unix_nanos: 0,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            size: 0,
            inodes: 0,
            remote: None,
        }
    }

    #[test]
    fn parses_the_filter_containerd_sends_for_remote_snapshots() {
        let filter = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="k8s.io/3/sha256:def""#,
        )
        .expect("parses");
        let target = record(
            "sha256:abc",
            "k8s.io/3/sha256:def",
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        assert!(filter.matches(&target));
        assert!(!filter.matches(&record("sha256:abc", "other", &[])));
        assert!(
            Filter::parse("kind==committed")
                .expect("kind")
                .matches(&target)
        );
        assert!(
            Filter::parse("kind!=active")
                .expect("kind")
                .matches(&target)
        );
        assert!(
            Filter::parse(r#"labels."containerd.io/snapshot.ref""#)
                .expect("presence")
                .matches(&target)
        );
        assert!(matches!(
            Filter::parse("name~=abc"),
            Err(SnapshotterError::InvalidArgument(_))
        ));
        assert!(matches!(
            Filter::parse("size==3"),
            Err(SnapshotterError::InvalidArgument(_))
        ));
        assert!(matches!(
            Filter::parse(r#"name=="abc"#),
            Err(SnapshotterError::InvalidArgument(_))
        ));
    }

    /// Found by the snapshot_labels fuzz target: `~=` inside a quoted value is text.
    #[test]
    fn a_quoted_tilde_equals_is_a_value_not_a_regex() {
        let filter = Filter::parse(r#"labels."k"=="a~=b""#).expect("parses");
        assert!(filter.matches(&record("n", "", &[("k", "a~=b")])));
    }
}
