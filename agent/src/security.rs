//! Bearer tokens and the agent's TLS certificate.
//!
//! The token is made at first start, printed once, and only its SHA-256 is stored. The TLS
//! certificate is self-signed, made at first start, and identified by its SHA-256
//! fingerprint, which clients pin.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::store::{Layout, write_atomic};

const TOKEN_HASH: &str = "token.sha256";
const CERT: &str = "tls-cert.pem";
const KEY: &str = "tls-key.pem";

/// Checks the bearer token on every request.
#[derive(Clone)]
pub struct TokenCheck {
    hash: [u8; 32],
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck")
    }
}

impl TokenCheck {
    pub fn from_hash(hash: [u8; 32]) -> Self {
        TokenCheck { hash }
    }

    /// Whether `token` is the agent's token (constant time in the token's content).
    pub fn accepts(&self, token: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        h.iter()
            .zip(self.hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing bearer token (authorization metadata)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))?;
        if self.accepts(token.trim()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

/// A new random token.
pub fn new_token() -> String {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).expect("the OS random number generator is available");
    format!("pvs_{}", hex::encode(b))
}

/// The stored token's check, if a token was made before.
pub fn load_token(layout: &Layout) -> Result<Option<TokenCheck>> {
    let path = layout.secrets().join(TOKEN_HASH);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim()).context("the stored token hash is damaged")?;
            let hash: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("the stored token hash is damaged"))?;
            Ok(Some(TokenCheck::from_hash(hash)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot read the token hash"),
    }
}

/// A new token, made in memory. [`NewToken::install`] stores it and shows it, and takes it
/// back if it cannot be shown, so a token nobody saw never becomes the agent's.
pub struct NewToken {
    token: String,
    hash: [u8; 32],
}

impl NewToken {
    pub fn new() -> Self {
        let token = new_token();
        let hash = Sha256::digest(token.as_bytes()).into();
        NewToken { token, hash }
    }

    /// The token, to show.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn check(&self) -> TokenCheck {
        TokenCheck::from_hash(self.hash)
    }

    /// Store the token's hash (from the next start it is the agent's token), then `show` the
    /// token. If showing fails the previous hash (or none) is put back, and the error returned.
    pub fn install(
        &self,
        layout: &Layout,
        show: impl FnOnce(&str) -> Result<()>,
    ) -> Result<TokenCheck> {
        let path = layout.secrets().join(TOKEN_HASH);
        let previous = match fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context("cannot read the token hash"),
        };
        write_atomic(&path, format!("{}\n", hex::encode(self.hash)).as_bytes())
            .context("cannot store the token hash")?;
        if let Err(e) = show(&self.token) {
            let undone = match &previous {
                Some(b) => write_atomic(&path, b),
                None => fs::remove_file(&path),
            };
            if let Err(u) = undone {
                tracing::error!("cannot take back the token that was not shown: {u}");
            }
            return Err(e);
        }
        Ok(self.check())
    }
}

impl Default for NewToken {
    fn default() -> Self {
        Self::new()
    }
}

/// The agent's certificate and key (PEM).
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Load the certificate, or make a self-signed one valid for `names` (host names and IP
/// addresses) on first start.
pub fn load_or_create_identity(layout: &Layout, names: &[String]) -> Result<TlsIdentity> {
    let cert_path = layout.secrets().join(CERT);
    let key_path = layout.secrets().join(KEY);
    if !cert_path.exists() || !key_path.exists() {
        let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
        let mut params =
            rcgen::CertificateParams::new(names.to_vec()).context("bad certificate names")?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "parvis-agent");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params
            .self_signed(&key)
            .context("cannot sign the certificate")?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_atomic(&cert_path, cert.pem().as_bytes()).context("cannot store the certificate")?;
    }
    let cert_pem = fs::read_to_string(&cert_path).context("cannot read the certificate")?;
    let key_pem = fs::read_to_string(&key_path).context("cannot read the key")?;
    let der = pem_to_der(&cert_pem).context("the stored certificate is damaged")?;
    Ok(TlsIdentity {
        fingerprint: proto::client::fingerprint_of(&der),
        cert_pem,
        key_pem,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .context("cannot write the key")?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).context("cannot store the key")?;
    Ok(())
}

/// The DER bytes of the first certificate in a PEM text.
fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn layout() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path().join("state"));
        l.create().unwrap();
        (d, l)
    }

    #[test]
    fn a_token_that_cannot_be_shown_is_not_kept() {
        let (_d, l) = layout();
        let first = NewToken::new();
        let e = first
            .install(&l, |_| anyhow::bail!("stdout is closed"))
            .unwrap_err();
        assert!(e.to_string().contains("stdout"), "{e}");
        assert!(
            load_token(&l).unwrap().is_none(),
            "an unseen token was kept"
        );
        first.install(&l, |_| Ok(())).unwrap();
        // A reset whose token cannot be shown leaves the old token working.
        let second = NewToken::new();
        assert!(second.install(&l, |_| anyhow::bail!("closed")).is_err());
        let check = load_token(&l).unwrap().unwrap();
        assert!(check.accepts(first.token()));
        assert!(!check.accepts(second.token()));
    }

    #[test]
    fn the_token_is_stored_hashed_and_shown() {
        let (_d, l) = layout();
        assert!(
            load_token(&l).unwrap().is_none(),
            "no token before the first start"
        );
        let new = NewToken::new();
        let token = new.token().to_string();
        assert!(new.check().accepts(&token));
        let mut shown = String::new();
        let check = new
            .install(&l, |t| {
                shown = t.to_string();
                Ok(())
            })
            .unwrap();
        assert_eq!(shown, token);
        assert!(check.accepts(&token));
        assert!(!check.accepts("pvs_wrong"));
        let stored = fs::read_to_string(l.secrets().join(TOKEN_HASH)).unwrap();
        assert!(!stored.contains(&token));
        let again = load_token(&l).unwrap().expect("stored");
        assert!(again.accepts(&token));
    }

    #[test]
    fn the_interceptor_rejects_missing_and_wrong_tokens() {
        let (_d, l) = layout();
        let new = NewToken::new();
        let mut check = new.install(&l, |_| Ok(())).unwrap();
        let token = new.token().to_string();
        let none = check.call(Request::new(())).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer pvs_nope".parse().unwrap());
        assert_eq!(
            check.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut right = Request::new(());
        right
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert!(check.call(right).is_ok());
    }

    #[test]
    fn the_certificate_is_made_once_and_its_fingerprint_is_stable() {
        let (_d, l) = layout();
        let a = load_or_create_identity(&l, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let b = load_or_create_identity(&l, &["other".into()]).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 95);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(l.secrets().join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
    }
}
