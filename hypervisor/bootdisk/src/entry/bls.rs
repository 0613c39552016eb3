//! Boot Loader Specification type #1 entries (`/loader/entries/*.conf`), as RHEL 8+, Fedora,
//! and systemd-boot installations write them; `$variables` in `options` (RHEL 8's
//! `$kernelopts`) come from grubenv.

use std::cmp::Ordering;
use std::collections::HashMap;

/// One entry file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlsEntry {
    /// The file name without `.conf` (what grubenv's `saved_entry` names).
    pub id: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub sort_key: Option<String>,
    pub linux: Option<String>,
    pub initrds: Vec<String>,
    pub options: String,
}

/// Parse one entry; `vars` expand `$name` and `${name}` in its options.
pub fn parse_entry(id: &str, text: &str, vars: &HashMap<String, String>) -> BlsEntry {
    let mut e = BlsEntry {
        id: id.to_string(),
        ..BlsEntry::default()
    };
    let mut options: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((k, v)) => (k, v.trim()),
            None => (line, ""),
        };
        match k {
            "title" => e.title = Some(v.to_string()),
            "version" => e.version = Some(v.to_string()),
            "sort-key" => e.sort_key = Some(v.to_string()),
            "linux" => e.linux = Some(v.to_string()),
            // RHEL's `initrd /initramfs-X.img $tuned_initrd`: variables expand, and may
            // expand to nothing.
            "initrd" => e
                .initrds
                .extend(expand_vars(v, vars).split_whitespace().map(String::from)),
            "options" => options.push(expand_vars(v, vars)),
            _ => {}
        }
    }
    e.options = options
        .iter()
        .flat_map(|o| o.split_whitespace())
        .collect::<Vec<_>>()
        .join(" ");
    e
}

/// Replace `$name` and `${name}` with their values (unknown ones with nothing).
pub fn expand_vars(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, next) = if let Some(b) = after.strip_prefix('{') {
            match b.find('}') {
                Some(j) => (&b[..j], &b[j + 1..]),
                None => ("", after),
            }
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..n], &after[n..])
        };
        if name.is_empty() {
            out.push('$');
        } else if let Some(v) = vars.get(name) {
            out.push_str(v);
        }
        rest = next;
    }
    out.push_str(rest);
    out
}

/// Compare versions as rpm and systemd do: runs of digits numerically, runs of letters
/// alphabetically, `~` before anything.
pub fn vercmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        // Skip separators.
        let skip = |s: &mut &[u8]| {
            while let Some(&c) = s.first() {
                if c.is_ascii_alphanumeric() || c == b'~' {
                    break;
                }
                *s = &s[1..];
            }
        };
        skip(&mut a);
        skip(&mut b);
        match (a.first() == Some(&b'~'), b.first() == Some(&b'~')) {
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (true, true) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            _ => {}
        }
        match (a.is_empty(), b.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        let digits = a[0].is_ascii_digit();
        if digits != b[0].is_ascii_digit() {
            // Numbers sort after letters.
            return if digits {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let take = |s: &[u8]| {
            s.iter()
                .take_while(|c| {
                    if digits {
                        c.is_ascii_digit()
                    } else {
                        c.is_ascii_alphabetic()
                    }
                })
                .count()
        };
        let (na, nb) = (take(a), take(b));
        let (pa, pb) = (&a[..na], &b[..nb]);
        let ord = if digits {
            let ta = trim_zeros(pa);
            let tb = trim_zeros(pb);
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            pa.cmp(pb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
        a = &a[na..];
        b = &b[nb..];
    }
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b'0').count();
    &s[n..]
}

/// Sort entries newest first, as the menu shows them: by sort key, then version (highest
/// first), then file name (highest first).
pub fn sort(entries: &mut [BlsEntry]) {
    entries.sort_by(|a, b| {
        a.sort_key
            .cmp(&b.sort_key)
            .then_with(|| {
                vercmp(
                    b.version.as_deref().unwrap_or(""),
                    a.version.as_deref().unwrap_or(""),
                )
            })
            .then_with(|| vercmp(&b.id, &a.id))
    });
}
