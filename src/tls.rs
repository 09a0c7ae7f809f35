//! TLS with rustls and one crypto provider (ring): the client-facing certificate, reloaded without
//! dropping connections, and the client configuration for `https://` clusters.
//!
//! Downstream, the listener's [`ServerConfig`] resolves its certificate through [`CertResolver`],
//! an `ArcSwap<CertifiedKey>`: a reload swaps the pointer, so handshakes from then on present the
//! new certificate while established connections keep the session they negotiated. [`ServerTls`]
//! owns the files: [`ServerTls::reload`] re-reads them (on SIGHUP, see `Gateway::reload_tls`), and
//! [`ServerTls::spawn_watcher`] checks them for changes every `tls.reload_interval`. A reload that fails (unreadable file, bad PEM, key not matching the
//! certificate) logs an error and keeps the old certificate. Both outcomes are counted in
//! `rayshift_tls_reloads_total{result}`; `rayshift_tls_reload_failing` is 1 from a failure (or
//! files becoming unreadable) until the files load again.
//!
//! Upstream, [`client_config`] trusts the PEM certificates of `upstream.ca_file`, or the Mozilla
//! roots compiled in (webpki-roots) when no CA file is set. ALPN is left empty: Serve speaks
//! HTTP/1.1.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::config::TlsConfig;
use crate::telemetry;

/// ALPN protocols offered to clients, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate, key or CA file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        /// `tls.cert_file`, `tls.key_file` or `upstream.ca_file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM, or holds nothing of the expected kind.
    #[error("{what} {}: {message}", path.display())]
    Pem {
        /// `tls.cert_file`, `tls.key_file` or `upstream.ca_file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key and certificate were read but cannot be used together.
    #[error("tls.key_file {} does not fit tls.cert_file {}: {message}", key.display(), cert.display())]
    Key {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        message: String,
    },
    /// rustls refused the configuration (not expected with the ring provider's defaults).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A reload was asked for but the gateway does not serve TLS.
    #[error("TLS is not configured (no tls: section)")]
    NotConfigured,
}

/// The one crypto provider rayshift uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default crypto provider. A provider installed earlier (by
/// another gateway in this process, or by a test) is left as it is.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a certificate chain (leaf first) and its private key from PEM files and checks that the
/// key matches the certificate.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(CERT, cert_file)?;
    let key_pem = read(KEY, key_file)?;
    parse_certified_key(cert_file, &cert_pem, key_file, &key_pem)
}

const CERT: &str = "tls.cert_file";
const KEY: &str = "tls.key_file";

/// [`load_certified_key`] of the files' contents, already read (the paths name them in errors).
fn parse_certified_key(
    cert_file: &Path,
    cert_pem: &[u8],
    key_file: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let certs = parse_certs(CERT, cert_file, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: KEY,
        path: key_file.to_path_buf(),
        message: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key found (expected a PEM block BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)".into()
            }
            e => format!("invalid PEM: {e}"),
        },
    })?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Key {
        cert: cert_file.to_path_buf(),
        key: key_file.to_path_buf(),
        message: e.to_string(),
    })
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM file's contents, in file order; at least one.
fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate found (expected a PEM block BEGIN CERTIFICATE)".into(),
        ));
    }
    Ok(certs)
}

/// A certificate resolver whose certificate can be swapped while connections are open.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    /// A resolver presenting `key` until [`set`](Self::set) replaces it.
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// Presents `key` in every handshake from now on.
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The certificate presented now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("chain_len", &self.current.load().cert.len())
            .finish()
    }
}

/// A version of the certificate and key files: a hash of their contents (`None` for a file that
/// cannot be read at the moment). Contents rather than modification times: a file rewritten within
/// the filesystem's timestamp granularity, or swapped by a symlink (Kubernetes secret volumes), is
/// still noticed, and touching a file does not reload it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version(Option<u64>, Option<u64>);

/// The certificate and key files as read in one look (`None`: missing at the moment). A reload
/// parses the very bytes its version was taken of: files read twice could change in between (a
/// deploy copying them in place), and the version recorded would be one that never loaded.
struct Contents {
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

impl Contents {
    /// Reads both files; a file that is missing has no contents (it is being replaced). Any
    /// other read error (permissions, a directory) is returned, naming the file.
    fn read(cert_file: &Path, key_file: &Path) -> Result<Contents, String> {
        let read = |key: &str, path: &Path| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {key} {}: {e}", path.display())),
        };
        Ok(Contents {
            cert: read(CERT, cert_file)?,
            key: read(KEY, key_file)?,
        })
    }

    /// The certificate of `contents` when both files were read; else a load from the files,
    /// which reports the one that cannot be read.
    fn load(
        contents: Option<Contents>,
        cert_file: &Path,
        key_file: &Path,
    ) -> Result<CertifiedKey, TlsError> {
        match contents {
            Some(Contents {
                cert: Some(cert),
                key: Some(key),
            }) => parse_certified_key(cert_file, &cert, key_file, &key),
            _ => load_certified_key(cert_file, key_file),
        }
    }

    fn version(&self) -> Version {
        let hash = |bytes: &Option<Vec<u8>>| bytes.as_deref().map(xxhash_rust::xxh3::xxh3_64);
        Version(hash(&self.cert), hash(&self.key))
    }

    /// The file that is missing, if one is.
    fn missing<'a>(
        &self,
        cert_file: &'a Path,
        key_file: &'a Path,
    ) -> Option<(&'static str, &'a Path)> {
        if self.cert.is_none() {
            Some((CERT, cert_file))
        } else if self.key.is_none() {
            Some((KEY, key_file))
        } else {
            None
        }
    }
}

/// Polls a certificate or key file may be missing for (being replaced) before that is reported.
const MISSING_POLLS: u32 = 3;

/// The listener's TLS: its rustls configuration and the files its certificate comes from.
#[derive(Debug)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    resolver: Arc<CertResolver>,
    cert_file: PathBuf,
    key_file: PathBuf,
    reload_interval: Duration,
    /// The files' version at the last load attempt, successful or not: a version that failed is
    /// not tried again until a file changes.
    version: Mutex<Version>,
    /// Why the files could not be read at the last look (reported once, not at every poll).
    unreadable: Mutex<Option<String>>,
    /// Polls in a row that found a file missing.
    missing_polls: std::sync::atomic::AtomicU32,
    /// Whether the last load of the files failed (`rayshift_tls_reload_failing`).
    load_failed: AtomicBool,
    /// Held through a reload (files' version, load, swap): a SIGHUP reload and the file watcher's
    /// cannot interleave so that an older load is swapped in last, with the newer version recorded.
    reloading: Mutex<()>,
}

impl ServerTls {
    /// Loads the certificate and key (an error names the file) and builds the server
    /// configuration: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, no client certificates.
    pub fn new(cfg: &TlsConfig) -> Result<ServerTls, TlsError> {
        // Unreadable or missing files fail the load just below, naming the file.
        let contents = Contents::read(&cfg.cert_file, &cfg.key_file).ok();
        let version = contents
            .as_ref()
            .map_or(Version(None, None), Contents::version);
        let key = Contents::load(contents, &cfg.cert_file, &cfg.key_file)?;
        let resolver = Arc::new(CertResolver::new(key));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        metrics::gauge!(telemetry::TLS_RELOAD_FAILING).set(0.0);
        Ok(ServerTls {
            config: Arc::new(config),
            resolver,
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            reload_interval: cfg.reload_interval,
            version: Mutex::new(version),
            unreadable: Mutex::new(None),
            missing_polls: std::sync::atomic::AtomicU32::new(0),
            load_failed: AtomicBool::new(false),
            reloading: Mutex::new(()),
        })
    }

    /// The rustls configuration for the listener (shared: reloads do not replace it).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// The resolver: the certificate presented now.
    pub fn resolver(&self) -> &Arc<CertResolver> {
        &self.resolver
    }

    /// Re-reads the certificate and key. On success new handshakes present the new certificate;
    /// on failure the old one stays. Open connections are not affected either way. Logged and
    /// counted in `rayshift_tls_reloads_total{result="ok"|"error"}`.
    pub fn reload(&self) -> Result<(), TlsError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let contents = Contents::read(&self.cert_file, &self.key_file).ok();
        *self.version.lock().unwrap_or_else(|e| e.into_inner()) = contents
            .as_ref()
            .map_or(Version(None, None), Contents::version);
        self.swap(Contents::load(contents, &self.cert_file, &self.key_file))
    }

    /// Records the outcome of a load in `rayshift_tls_reload_failing`.
    fn set_failing(&self, failed: bool) {
        self.load_failed.store(failed, Ordering::Relaxed);
        metrics::gauge!(telemetry::TLS_RELOAD_FAILING).set(f64::from(u8::from(failed)));
    }

    /// Presents `loaded` from now on, or keeps the current certificate when it failed.
    fn swap(&self, loaded: Result<CertifiedKey, TlsError>) -> Result<(), TlsError> {
        match loaded {
            Ok(key) => {
                self.resolver.set(key);
                metrics::counter!(telemetry::TLS_RELOADS_TOTAL, "result" => "ok").increment(1);
                self.set_failing(false);
                tracing::info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                metrics::counter!(telemetry::TLS_RELOADS_TOTAL, "result" => "error").increment(1);
                self.set_failing(true);
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the current certificate");
                Err(e)
            }
        }
    }

    /// Reloads if the certificate or key file changed since the last load attempt; whether it did.
    pub fn reload_if_changed(&self) -> bool {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let read = Contents::read(&self.cert_file, &self.key_file).and_then(|contents| {
            match contents.missing(&self.cert_file, &self.key_file) {
                None => {
                    self.missing_polls.store(0, Ordering::Relaxed);
                    Ok(Some(contents))
                }
                // Missing for a moment (an editor or a secret mount replacing it): wait. Missing
                // for longer (removed, a symlink whose target was pruned): reported.
                Some((key, path)) => {
                    if self.missing_polls.fetch_add(1, Ordering::Relaxed) + 1 >= MISSING_POLLS {
                        Err(format!(
                            "{key} {} is missing (for {MISSING_POLLS} checks in a row)",
                            path.display()
                        ))
                    } else {
                        Ok(None)
                    }
                }
            }
        });
        let contents = match read {
            Ok(Some(contents)) => {
                if self
                    .unreadable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .is_some()
                {
                    // Readable again: failing or not as the last load (unless a reload follows).
                    metrics::gauge!(telemetry::TLS_RELOAD_FAILING).set(f64::from(u8::from(
                        self.load_failed.load(Ordering::Relaxed),
                    )));
                }
                contents
            }
            Ok(None) => return false,
            Err(e) => {
                let mut last = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
                if last.as_deref() != Some(e.as_str()) {
                    metrics::counter!(telemetry::TLS_RELOADS_TOTAL, "result" => "error")
                        .increment(1);
                    metrics::gauge!(telemetry::TLS_RELOAD_FAILING).set(1.0);
                    tracing::error!(error = %e, "TLS certificate files cannot be read; keeping the current certificate");
                    *last = Some(e);
                }
                return false;
            }
        };
        let now = contents.version();
        {
            let mut last = self.version.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return false;
            }
            *last = now;
        }
        let _ = self.swap(Contents::load(
            Some(contents),
            &self.cert_file,
            &self.key_file,
        ));
        true
    }

    /// Polls the files every `tls.reload_interval` (unless it is 0) until `stop` turns true.
    pub fn spawn_watcher(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.reload_interval.is_zero() {
            return;
        }
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(tls.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = crate::gateway::stopped(&mut stop) => return,
                }
                let check = Arc::clone(&tls);
                // Reading files blocks: keep it off the runtime's worker threads.
                let _ = tokio::task::spawn_blocking(move || check.reload_if_changed()).await;
            }
        });
    }
}

/// The client configuration for `https://` clusters (requests and probes): trusts the
/// certificates in `ca_file`, or the Mozilla root certificates when it is `None`. No ALPN (the
/// connector sets what it needs), no client certificate.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            const CA: &str = "upstream.ca_file";
            for cert in parse_certs(CA, path, &read(CA, path)?)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    what: CA,
                    path: path.to_path_buf(),
                    message: format!("unusable CA certificate: {e}"),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// [`client_config`] without a CA file: the Mozilla root certificates.
pub fn default_client_config() -> ClientConfig {
    // Only reading a CA file can fail; ring supports the default protocol versions.
    client_config(None).expect("the ring provider supports TLS 1.2 and 1.3")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn cfg(cert_file: PathBuf, key_file: PathBuf) -> TlsConfig {
        TlsConfig {
            cert_file,
            key_file,
            reload_interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn loads_and_reloads_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let tls = ServerTls::new(&cfg(c.clone(), k.clone())).unwrap();
        let first = tls.resolver().current();
        assert!(!tls.reload_if_changed(), "nothing changed yet");
        write_pair(dir.path(), "two");
        assert!(tls.reload_if_changed());
        assert_ne!(first.cert, tls.resolver().current().cert);
        assert!(!tls.reload_if_changed());
        assert_eq!(
            tls.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn bad_files_are_named_and_keep_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let tls = ServerTls::new(&cfg(c.clone(), k.clone())).unwrap();
        let before = tls.resolver().current();

        std::fs::write(&c, "not a certificate\n").unwrap();
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains("tls.cert_file") && e.contains("cert.pem"), "{e}");
        assert!(e.contains("no certificate found"), "{e}");
        assert!(Arc::ptr_eq(&before, &tls.resolver().current()));

        // A key that belongs to another certificate.
        let other = tempfile::tempdir().unwrap();
        let (c2, _) = write_pair(other.path(), "two");
        std::fs::copy(&c2, &c).unwrap();
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        assert!(Arc::ptr_eq(&before, &tls.resolver().current()));

        let missing = dir.path().join("missing.pem");
        let e = ServerTls::new(&cfg(c, missing)).unwrap_err().to_string();
        assert!(
            e.contains("reading tls.key_file") && e.contains("missing.pem"),
            "{e}"
        );

        std::fs::write(&k, "-----BEGIN PRIVATE KEY-----\nnot base64!\n").unwrap();
        let e = load_certified_key(&c2, &k).unwrap_err().to_string();
        assert!(e.contains("tls.key_file"), "{e}");
    }

    /// A file missing for a moment is waited for; missing for longer, it is reported (counted,
    /// the failing gauge set), and the current certificate stays until it is back.
    #[test]
    fn a_file_missing_for_long_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let tls = ServerTls::new(&cfg(c.clone(), k.clone())).unwrap();
        let before = tls.resolver().current();
        std::fs::remove_file(&k).unwrap();
        for _ in 1..MISSING_POLLS {
            assert!(!tls.reload_if_changed());
            assert!(tls.unreadable.lock().unwrap().is_none(), "reported at once");
        }
        assert!(!tls.reload_if_changed());
        let reported = tls.unreadable.lock().unwrap().clone().unwrap();
        assert!(
            reported.contains("tls.key_file") && reported.contains("missing"),
            "{reported}"
        );
        assert!(Arc::ptr_eq(&before, &tls.resolver().current()));
        write_pair(dir.path(), "two");
        assert!(tls.reload_if_changed());
        assert!(tls.unreadable.lock().unwrap().is_none());
        assert!(!Arc::ptr_eq(&before, &tls.resolver().current()));
    }

    /// A file that exists but cannot be read (here: a directory in its place) is an error naming
    /// it, not "being replaced": the poll reports it and keeps the current certificate.
    #[test]
    fn an_unreadable_file_is_reported_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let tls = ServerTls::new(&cfg(c.clone(), k.clone())).unwrap();
        let before = tls.resolver().current();
        std::fs::remove_file(&k).unwrap();
        let missing = Contents::read(&c, &k).unwrap();
        assert_eq!(missing.version().1, None, "missing: wait");
        std::fs::create_dir(&k).unwrap();
        let e = Contents::read(&c, &k).err().unwrap();
        assert!(e.contains("tls.key_file") && e.contains("key.pem"), "{e}");
        assert!(!tls.reload_if_changed());
        assert_eq!(tls.unreadable.lock().unwrap().as_deref(), Some(e.as_str()));
        assert!(Arc::ptr_eq(&before, &tls.resolver().current()));
        // Readable again (a new pair): reloaded, and the report cleared.
        std::fs::remove_dir(&k).unwrap();
        write_pair(dir.path(), "two");
        assert!(tls.reload_if_changed());
        assert!(tls.unreadable.lock().unwrap().is_none());
        assert!(!Arc::ptr_eq(&before, &tls.resolver().current()));
    }

    #[test]
    fn client_config_reads_a_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = write_pair(dir.path(), "ca");
        assert!(client_config(Some(&c)).is_ok());
        assert!(client_config(None).is_ok());
        let e = client_config(Some(&dir.path().join("nope.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.ca_file"), "{e}");
    }
}
