//! The generated subset of GRUB's configuration language: what `grub-mkconfig` (Debian,
//! Ubuntu, RHEL without BLS, SUSE) writes, and the ESP stubs that `search` for /boot and
//! `configfile` it. Words with quotes and `$variables`, `set`, `if`/`elif`/`else`/`fi`,
//! `function` (skipped), `menuentry` and `submenu` blocks, and in an entry `search`,
//! `set root=`, `linux*` and `initrd*`. Nothing is executed: conditions are not evaluated,
//! an entry's commands are read in order through every branch (the generated branches only
//! differ in search hints).

use std::collections::HashMap;

/// A word: literal text and variable references, expanded later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Lit(String),
    Var(String),
}

pub type Word = Vec<Seg>;

/// Expand `w` with `env` (unknown variables are empty, as in GRUB).
pub fn expand(w: &Word, env: &HashMap<String, String>) -> String {
    let mut s = String::new();
    for seg in w {
        match seg {
            Seg::Lit(l) => s.push_str(l),
            Seg::Var(v) => s.push_str(env.get(v).map(String::as_str).unwrap_or("")),
        }
    }
    s
}

/// The literal text of `w` with variables written as `${name}`.
pub fn raw(w: &Word) -> String {
    let mut s = String::new();
    for seg in w {
        match seg {
            Seg::Lit(l) => s.push_str(l),
            Seg::Var(v) => {
                s.push_str("${");
                s.push_str(v);
                s.push('}');
            }
        }
    }
    s
}

/// Split a script into commands of words (newlines and `;` end a command; `{` and `}` are
/// words of their own when they stand alone).
pub fn tokenize(text: &str) -> Vec<Vec<Word>> {
    let mut cmds: Vec<Vec<Word>> = Vec::new();
    let mut cmd: Vec<Word> = Vec::new();
    let mut word: Word = Vec::new();
    let mut lit = String::new();
    let mut in_word = false;
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let flush_lit = |lit: &mut String, word: &mut Word| {
        if !lit.is_empty() {
            word.push(Seg::Lit(std::mem::take(lit)));
        }
    };
    // A variable reference at chars[i] ('$' already seen at i-1); returns its name and the
    // index after it.
    let var = |i: usize| -> Option<(String, usize)> {
        if chars.get(i) == Some(&'{') {
            let end = chars[i + 1..].iter().position(|&c| c == '}')? + i + 1;
            Some((chars[i + 1..end].iter().collect(), end + 1))
        } else {
            let n = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_' || **c == '?' || **c == '#')
                .count();
            (n > 0).then(|| (chars[i..i + n].iter().collect(), i + n))
        }
    };
    macro_rules! end_word {
        () => {
            if in_word {
                flush_lit(&mut lit, &mut word);
                cmd.push(std::mem::take(&mut word));
                in_word = false;
            }
        };
    }
    macro_rules! end_cmd {
        () => {
            end_word!();
            if !cmd.is_empty() {
                cmds.push(std::mem::take(&mut cmd));
            }
        };
    }
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' | ';' => {
                end_cmd!();
                i += 1;
            }
            ' ' | '\t' | '\r' => {
                end_word!();
                i += 1;
            }
            '#' if !in_word => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\\' => {
                in_word = true;
                match chars.get(i + 1) {
                    Some('\n') => {}
                    Some(&n) => lit.push(n),
                    None => {}
                }
                i += 2;
            }
            '\'' => {
                in_word = true;
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .map_or(chars.len(), |p| p + i + 1);
                lit.extend(&chars[i + 1..end]);
                i = end + 1;
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    match chars[i] {
                        '\\' if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '\n')) => {
                            if chars[i + 1] != '\n' {
                                lit.push(chars[i + 1]);
                            }
                            i += 2;
                        }
                        '$' => match var(i + 1) {
                            Some((name, next)) => {
                                flush_lit(&mut lit, &mut word);
                                word.push(Seg::Var(name));
                                i = next;
                            }
                            None => {
                                lit.push('$');
                                i += 1;
                            }
                        },
                        c => {
                            lit.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
            }
            '$' => {
                in_word = true;
                match var(i + 1) {
                    Some((name, next)) => {
                        flush_lit(&mut lit, &mut word);
                        word.push(Seg::Var(name));
                        i = next;
                    }
                    None => {
                        lit.push('$');
                        i += 1;
                    }
                }
            }
            '{' | '}' if !in_word => {
                // A brace alone (followed by a blank or the end of the command) is a word.
                let alone = matches!(
                    chars.get(i + 1),
                    None | Some(' ' | '\t' | '\n' | ';' | '\r')
                );
                if alone {
                    // `{` ends the command it opens a block for; `}` is a command of its
                    // own, so one-line blocks (`menuentry 'x' { linux /k }`) parse too.
                    if c == '}' {
                        end_cmd!();
                    }
                    cmd.push(vec![Seg::Lit(c.to_string())]);
                    end_cmd!();
                } else {
                    in_word = true;
                    lit.push(c);
                }
                i += 1;
            }
            c => {
                in_word = true;
                lit.push(c);
                i += 1;
            }
        }
    }
    if in_word {
        flush_lit(&mut lit, &mut word);
        cmd.push(word);
    }
    if !cmd.is_empty() {
        cmds.push(cmd);
    }
    cmds
}

/// A parsed script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Cmd(Vec<Word>),
    /// A `menuentry` (`sub` false) or `submenu` (`sub` true).
    Menu {
        sub: bool,
        title: Word,
        args: Vec<Word>,
        body: Vec<Node>,
    },
    /// An `if` with each branch's commands (conditions are not kept).
    If(Vec<Vec<Node>>),
}

fn is(w: &Word, s: &str) -> bool {
    matches!(w.as_slice(), [Seg::Lit(l)] if l == s)
}

/// Parse commands into blocks. Unbalanced input ends its blocks at the end of the script.
pub fn parse(cmds: &[Vec<Word>]) -> Vec<Node> {
    // "then x", "else x", "do x" on one line: the keyword, then a command of its own.
    let mut flat: Vec<Vec<Word>> = Vec::with_capacity(cmds.len());
    for c in cmds {
        let kw = c.first().map(raw);
        if c.len() > 1 && matches!(kw.as_deref(), Some("then" | "else" | "do")) {
            flat.push(vec![c[0].clone()]);
            flat.push(c[1..].to_vec());
        } else {
            flat.push(c.clone());
        }
    }
    let mut pos = 0;
    parse_block(&flat, &mut pos, 0).0
}

const MAX_NESTING: usize = 32;

/// Parse until a closing `}` or an `elif`/`else`/`fi`/`done`, returning the nodes and the
/// word that ended them.
fn parse_block(cmds: &[Vec<Word>], pos: &mut usize, depth: usize) -> (Vec<Node>, Option<String>) {
    let mut out = Vec::new();
    while *pos < cmds.len() {
        let cmd = &cmds[*pos];
        *pos += 1;
        let Some(first) = cmd.first().map(raw) else {
            continue;
        };
        match first.as_str() {
            "}" | "fi" | "else" | "elif" | "done" => return (out, Some(first)),
            "then" | "do" => continue,
            _ => {}
        }
        if depth >= MAX_NESTING {
            out.push(Node::Cmd(cmd.clone()));
            continue;
        }
        match first.as_str() {
            "menuentry" | "submenu" if cmd.len() >= 3 && cmd.last().is_some_and(|w| is(w, "{")) => {
                let (body, _) = parse_block(cmds, pos, depth + 1);
                out.push(Node::Menu {
                    sub: first == "submenu",
                    title: cmd[1].clone(),
                    args: cmd[2..cmd.len() - 1].to_vec(),
                    body,
                });
            }
            "function" => {
                // Only run when called; the generated files call none that matter here.
                let _ = parse_block(cmds, pos, depth + 1);
            }
            "if" | "while" | "for" => {
                let mut branches = Vec::new();
                loop {
                    let (b, end) = parse_block(cmds, pos, depth + 1);
                    branches.push(b);
                    if !matches!(end.as_deref(), Some("elif" | "else")) {
                        break;
                    }
                }
                out.push(Node::If(branches));
            }
            _ => out.push(Node::Cmd(cmd.clone())),
        }
    }
    (out, None)
}

/// Where GRUB is told a file system is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A partition of the boot disk by number (`hd0,gpt2`, `hd0,msdos5`).
    Part(u32),
    /// The file system with this UUID (`search --fs-uuid`).
    Uuid(String),
    /// The file system with this label (`search --label`).
    Label(String),
    /// Whichever file system holds this file (`search --file`).
    File(String),
    /// Something this reader cannot open: LVM, RAID, another disk; the words say which.
    Unsupported(String),
}

/// Parse a GRUB device name (without parentheses): `hd0,gpt2`, `hd0,msdos1`, `hd0,3`,
/// `lvm/vg-root`, `md/0`, ...
pub fn device(name: &str) -> Device {
    if let Some(u) = name.strip_prefix("uuid:") {
        return Device::Uuid(u.to_string());
    }
    if let Some(l) = name.strip_prefix("label:") {
        return Device::Label(l.to_string());
    }
    if let Some(f) = name.strip_prefix("file:") {
        return Device::File(f.to_string());
    }
    if name.starts_with("lvm/") || name.starts_with("lvmid/") {
        return Device::Unsupported("LVM".into());
    }
    if name.starts_with("md/") || name.starts_with("mduuid/") {
        return Device::Unsupported("software RAID".into());
    }
    if name.starts_with("cryptouuid/") {
        return Device::Unsupported("an encrypted (LUKS) volume".into());
    }
    let mut parts = name.split(',');
    let disk = parts.next().unwrap_or("");
    if disk != "hd0" {
        return Device::Unsupported(format!("another disk ({disk})"));
    }
    let Some(p) = parts.next() else {
        return Device::Unsupported("the whole disk".into());
    };
    let digits = p.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    match digits.parse() {
        Ok(n) if parts.next().is_none() => Device::Part(n),
        _ => Device::Unsupported(format!("a nested partition ({name})")),
    }
}

/// A path as GRUB writes it: `(device)/path` or `/path` on the current root.
pub fn split_path(p: &str) -> (Option<Device>, String) {
    if let Some(rest) = p.strip_prefix('(')
        && let Some(end) = rest.find(')')
    {
        let path = &rest[end + 1..];
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        return (Some(device(&rest[..end])), path);
    }
    (None, p.to_string())
}

/// What a menu entry's commands say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryCmds {
    /// Its root file system (from `search` or `set root=`), if it names one.
    pub root: Option<Device>,
    /// `linux` path and arguments (expanded).
    pub linux: Option<(String, Vec<String>)>,
    /// `initrd` paths.
    pub initrds: Vec<String>,
}

/// A menu item as GRUB lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub title: String,
    pub id: Option<String>,
    pub kind: ItemKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    Entry(EntryCmds),
    Sub(Vec<Item>),
}

/// What a grub.cfg says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub items: Vec<Item>,
    /// The default entry as written after expansion ("0", "1>2", a title or an id).
    pub default: Option<String>,
    /// The file runs `blscfg`: its entries are the Boot Loader Spec snippets.
    pub blscfg: bool,
    /// The file hands over to another (`configfile`), as ESP stubs do.
    pub configfile: Option<(Option<Device>, String)>,
    /// Variables set at the top level (and grubenv's).
    pub env: HashMap<String, String>,
}

/// The root a `search` command sets, if it sets `root`.
fn search(cmd: &[String]) -> Option<Device> {
    let name = cmd[0].as_str();
    let mut kind = match name {
        "search.fs_uuid" => "uuid",
        "search.fs_label" => "label",
        "search.file" => "file",
        _ => "file",
    };
    let mut var = None;
    let mut target = None;
    let mut positional = Vec::new();
    let mut it = cmd[1..].iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "--fs-uuid" | "-u" => kind = "uuid",
            "--label" | "-l" => kind = "label",
            "--file" | "-f" => kind = "file",
            "--set" | "-s" => var = it.next().cloned(),
            w if w.starts_with("--set=") => var = Some(w[6..].to_string()),
            w if w.starts_with('-') => {}
            w => positional.push(w.to_string()),
        }
    }
    if name.starts_with("search.") {
        // search.fs_uuid UUID [VAR [HINTS...]]
        target = positional.first().cloned();
        if var.is_none() {
            var = positional.get(1).cloned();
        }
    } else if let Some(t) = positional.first() {
        target = Some(t.clone());
    }
    if var.as_deref().is_some_and(|v| v != "root") {
        return None;
    }
    let t = target?;
    Some(match kind {
        "uuid" => Device::Uuid(t),
        "label" => Device::Label(t),
        _ => Device::File(t),
    })
}

/// The name GRUB's `$root` gets for a device, so that `($root)/path` parses back.
fn device_var(d: &Device) -> String {
    match d {
        Device::Part(n) => format!("hd0,{n}"),
        Device::Uuid(u) => format!("uuid:{u}"),
        Device::Label(l) => format!("label:{l}"),
        Device::File(f) => format!("file:{f}"),
        Device::Unsupported(w) => format!("unsupported:{w}"),
    }
}

fn entry_cmds(body: &[Node], env: &HashMap<String, String>, out: &mut EntryCmds) {
    let mut env = env.clone();
    for n in body {
        match n {
            Node::If(branches) => {
                for b in branches {
                    entry_cmds(b, &env, out);
                }
            }
            Node::Menu { .. } => {}
            Node::Cmd(words) => {
                let w: Vec<String> = words.iter().map(|w| expand(w, &env)).collect();
                match w[0].as_str() {
                    "set" => {
                        if let Some((k, v)) = w.get(1).and_then(|a| a.split_once('=')) {
                            if k == "root" && out.root.is_none() {
                                let d = v.trim_matches(|c| c == '(' || c == ')');
                                out.root = Some(device(d));
                            }
                            env.insert(k.to_string(), v.to_string());
                        }
                    }
                    s if s == "search" || s.starts_with("search.") => {
                        if (out.root.is_none() || matches!(out.root, Some(Device::Part(_))))
                            && let Some(d) = search(&w)
                        {
                            out.root = Some(d);
                        }
                    }
                    "linux" | "linuxefi" | "linux16" if w.len() >= 2 && out.linux.is_none() => {
                        out.linux = Some((w[1].clone(), w[2..].to_vec()));
                    }
                    "initrd" | "initrdefi" | "initrd16" if out.initrds.is_empty() => {
                        out.initrds = w[1..].to_vec();
                    }
                    _ => {}
                }
            }
        }
    }
}

fn menu_id(args: &[Word], env: &HashMap<String, String>) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let is_id_option = matches!(a.as_slice(), [Seg::Var(v)] if v == "menuentry_id_option");
        let r = raw(a);
        if is_id_option || r == "--id" {
            return it.next().map(|w| expand(w, env));
        }
        if let Some(id) = r.strip_prefix("--id=") {
            return Some(id.to_string());
        }
    }
    None
}

fn items(nodes: &[Node], env: &HashMap<String, String>, out: &mut Vec<Item>, depth: usize) {
    for n in nodes {
        match n {
            Node::Menu {
                sub,
                title,
                args,
                body,
            } => {
                let title = expand(title, env);
                let id = menu_id(args, env);
                let kind = if *sub {
                    let mut children = Vec::new();
                    if depth < MAX_NESTING {
                        items(body, env, &mut children, depth + 1);
                    }
                    ItemKind::Sub(children)
                } else {
                    let mut c = EntryCmds::default();
                    entry_cmds(body, env, &mut c);
                    ItemKind::Entry(c)
                };
                out.push(Item { title, id, kind });
            }
            Node::If(branches) => {
                for b in branches {
                    items(b, env, out, depth);
                }
            }
            Node::Cmd(_) => {}
        }
    }
}

/// Walk the top level: variables, the default, `blscfg`, `configfile`.
fn top(nodes: &[Node], cfg: &mut Config, conditional: bool) {
    for n in nodes {
        match n {
            Node::If(branches) => {
                for b in branches {
                    top(b, cfg, true);
                }
            }
            Node::Menu { .. } => {}
            Node::Cmd(words) => {
                let name = raw(&words[0]);
                match name.as_str() {
                    "set" if words.len() >= 2 => {
                        let whole = raw(&words[1]);
                        let Some((k, _)) = whole.split_once('=') else {
                            continue;
                        };
                        let v = expand(&words[1], &cfg.env);
                        let v = v.split_once('=').map(|x| x.1).unwrap_or("").to_string();
                        if k == "default" {
                            // `set default="${next_entry}"` is a one-shot override, unset
                            // at rest; everything else is the default as configured.
                            if !whole.contains("next_entry") {
                                cfg.default = Some(v.clone());
                            }
                            continue;
                        }
                        // In a branch, a value is a fallback (RHEL 8 sets kernelopts only
                        // when grubenv lacks it): set it only when unset.
                        if !conditional || !cfg.env.contains_key(k) {
                            cfg.env.insert(k.to_string(), v);
                        }
                    }
                    "blscfg" => cfg.blscfg = true,
                    "configfile" if words.len() >= 2 => {
                        let p = expand(&words[1], &cfg.env);
                        cfg.configfile = Some(split_path(&p));
                    }
                    s if s == "search" || s.starts_with("search.") => {
                        let w: Vec<String> = words.iter().map(|w| expand(w, &cfg.env)).collect();
                        if let Some(d) = search(&w) {
                            cfg.env.insert("root".into(), device_var(&d));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Read a grub.cfg, with grubenv's variables (`saved_entry`, `kernelopts`, ...).
pub fn read_config(text: &str, grubenv: &HashMap<String, String>) -> Config {
    let nodes = parse(&tokenize(text));
    let mut cfg = Config {
        env: grubenv.clone(),
        ..Config::default()
    };
    top(&nodes, &mut cfg, false);
    let env = cfg.env.clone();
    items(&nodes, &env, &mut cfg.items, 0);
    cfg
}

/// Parse grubenv: a 1 KiB block of `key=value` lines padded with `#`.
pub fn read_grubenv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

/// The item path (indices, outermost first) the default names; an entry, never a submenu.
pub fn select(items: &[Item], default: Option<&str>) -> Option<Vec<usize>> {
    let d = default.unwrap_or("0").trim();
    let d = if d.is_empty() { "0" } else { d };
    let mut level = items;
    let mut path = Vec::new();
    for part in d.split('>') {
        let i = match part.trim().parse::<usize>() {
            Ok(i) => i,
            Err(_) => level
                .iter()
                .position(|it| it.id.as_deref() == Some(part) || it.title == part)?,
        };
        let it = level.get(i)?;
        path.push(i);
        match &it.kind {
            ItemKind::Sub(children) => level = children,
            ItemKind::Entry(_) => return Some(path),
        }
    }
    // Named a submenu: GRUB opens it; its first entry is the one that boots.
    while let Some(first) = level.first() {
        path.push(0);
        match &first.kind {
            ItemKind::Sub(children) => level = children,
            ItemKind::Entry(_) => return Some(path),
        }
    }
    None
}

/// The entry at `path`.
pub fn at<'a>(items: &'a [Item], path: &[usize]) -> Option<&'a Item> {
    let (first, rest) = path.split_first()?;
    let it = items.get(*first)?;
    if rest.is_empty() {
        return Some(it);
    }
    match &it.kind {
        ItemKind::Sub(children) => at(children, rest),
        ItemKind::Entry(_) => None,
    }
}

/// Every entry with a `linux` command, in menu order, with its path.
pub fn entries(items: &[Item]) -> Vec<(Vec<usize>, &Item)> {
    fn walk<'a>(items: &'a [Item], prefix: &mut Vec<usize>, out: &mut Vec<(Vec<usize>, &'a Item)>) {
        for (i, it) in items.iter().enumerate() {
            prefix.push(i);
            match &it.kind {
                ItemKind::Entry(c) if c.linux.is_some() => out.push((prefix.clone(), it)),
                ItemKind::Entry(_) => {}
                ItemKind::Sub(children) => walk(children, prefix, out),
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(items, &mut Vec::new(), &mut out);
    out
}
