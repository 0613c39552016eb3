//! What Debian and Ubuntu keep besides grub.cfg: `/etc/default/grub` (and `grub.d/*.cfg`),
//! `/etc/fstab`, `/etc/os-release`, and kernel file names.

use std::collections::HashMap;

use super::grub::{expand, tokenize};

/// Shell-style `KEY=value` assignments, in order, each seeing the ones before
/// (`GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT console=ttyS0"`).
pub fn assignments(text: &str, env: &mut HashMap<String, String>) {
    for cmd in tokenize(text) {
        // `export KEY=value` too.
        let w = if cmd.len() == 2 && expand(&cmd[0], env) == "export" {
            &cmd[1]
        } else if cmd.len() == 1 {
            &cmd[0]
        } else {
            continue;
        };
        let v = expand(w, env);
        if let Some((k, v)) = v.split_once('=')
            && !k.is_empty()
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            env.insert(k.to_string(), v.to_string());
        }
    }
}

/// One fstab line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub spec: String,
    pub dir: String,
    pub fstype: String,
    pub options: String,
}

/// The mounts of an fstab (comments and malformed lines skipped; octal escapes decoded).
pub fn fstab(text: &str) -> Vec<Mount> {
    let unescape = |s: &str| s.replace("\\040", " ").replace("\\011", "\t");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| Mount {
                spec: unescape(f[0]),
                dir: unescape(f[1]),
                fstype: f[2].to_string(),
                options: f.get(3).unwrap_or(&"defaults").to_string(),
            })
        })
        .collect()
}

/// `/etc/os-release`'s fields.
pub fn os_release(text: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    assignments(text, &mut env);
    env
}

/// The kernel version a file name carries (`vmlinuz-6.1.0-9-amd64` → `6.1.0-9-amd64`).
pub fn kernel_version(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    for p in ["vmlinuz-", "vmlinux-", "bzImage-", "kernel-", "linux-"] {
        if let Some(v) = name.strip_prefix(p) {
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    None
}

/// The initrd names distributions give the image for kernel `v`, most likely first.
pub fn initrd_names(v: &str) -> [String; 4] {
    [
        format!("initrd.img-{v}"),
        format!("initramfs-{v}.img"),
        format!("initrd-{v}"),
        format!("initrd-{v}.img"),
    ]
}
