//! How every Gristmill process connects to NATS: the URL, credentials (a `.creds` file with a
//! JWT and NKey, a user and password, or a token — as flags, environment variables or in the
//! URL) and TLS (a CA to trust, a client certificate for mutual TLS).
//!
//! Secrets never reach logs: [`NatsArgs`]'s `Debug` and [`redact`] print `<set>` for them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::{ConnectOptions, Event, ServerAddr, ServerError};
use clap::Args;

/// Connection settings of NATS, shared by `coordinator` and `worker`.
#[derive(Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL (JetStream enabled). `tls://` requires TLS; credentials may ride in it
    /// as `nats://USER:PASSWORD@HOST:PORT` or `nats://TOKEN@HOST:PORT`.
    #[arg(
        long = "nats",
        default_value = "nats://127.0.0.1:4222",
        env = "GRISTMILL_NATS_URL",
        hide_env_values = true
    )]
    pub url: String,

    /// NATS credentials file (a user JWT and its NKey seed, as `nsc` writes them).
    #[arg(long, env = "GRISTMILL_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// NATS user name (with --nats-password).
    #[arg(long, env = "GRISTMILL_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password (with --nats-user); prefer the environment variable to the flag.
    #[arg(long, env = "GRISTMILL_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// NATS authentication token; prefer the environment variable to the flag.
    #[arg(long, env = "GRISTMILL_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,

    /// PEM file of the certificate authorities to trust for the NATS server's certificate
    /// (turns TLS on).
    #[arg(long, env = "GRISTMILL_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (with --nats-tls-key).
    #[arg(long, env = "GRISTMILL_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,

    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "GRISTMILL_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
}

impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| o.as_ref().map(|_| "<set>");
        f.debug_struct("NatsArgs")
            .field("url", &redact(&self.url))
            .field("nats_creds", &self.nats_creds)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &set(&self.nats_password))
            .field("nats_token", &set(&self.nats_token))
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .finish()
    }
}

/// The URL without the credentials it may carry (for logs and errors).
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://<credentials>@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// `%XX` sequences of a URL's user or password decoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the process authenticates, after flags and URL are reconciled.
#[derive(PartialEq, Eq)]
enum Auth {
    None,
    Creds(PathBuf),
    UserPassword(String, String),
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => write!(f, "None"),
            Auth::Creds(p) => write!(f, "Creds({})", p.display()),
            Auth::UserPassword(u, _) => write!(f, "UserPassword({u}, <set>)"),
            Auth::Token(_) => write!(f, "Token(<set>)"),
        }
    }
}

impl NatsArgs {
    /// The one way this process authenticates; an error names conflicting or half-given
    /// settings.
    fn auth(&self) -> Result<Auth> {
        let addr: ServerAddr = self
            .url
            .parse()
            .with_context(|| format!("--nats {:?} is not a NATS URL", redact(&self.url)))?;
        let url_auth = match (addr.username(), addr.password()) {
            (Some(u), Some(p)) => Some(Auth::UserPassword(percent_decode(u), percent_decode(p))),
            (Some(t), None) => Some(Auth::Token(percent_decode(t))),
            _ => None,
        };
        let flag_user = match (&self.nats_user, &self.nats_password) {
            (Some(u), Some(p)) => Some(Auth::UserPassword(u.clone(), p.clone())),
            (Some(_), None) => {
                bail!("--nats-user needs --nats-password (or GRISTMILL_NATS_PASSWORD)")
            }
            (None, Some(_)) => bail!("--nats-password needs --nats-user"),
            (None, None) => None,
        };
        let all: Vec<Auth> = [
            self.nats_creds.clone().map(Auth::Creds),
            flag_user,
            self.nats_token.clone().map(Auth::Token),
            url_auth,
        ]
        .into_iter()
        .flatten()
        .collect();
        if all.len() > 1 {
            bail!(
                "NATS credentials are given more than one way ({}); give one of --nats-creds, \
                 --nats-user/--nats-password, --nats-token or credentials in the URL",
                all.iter()
                    .map(|a| match a {
                        Auth::Creds(_) => "a creds file",
                        Auth::UserPassword(..) => "a user and password",
                        Auth::Token(_) => "a token",
                        Auth::None => "none",
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(all.into_iter().next().unwrap_or(Auth::None))
    }

    /// The URL to dial: the given one without its credentials (they travel in CONNECT).
    fn dial_url(&self) -> String {
        redact(&self.url).replace("<credentials>@", "")
    }

    /// Connect options for a process named `name`; checks every file it names.
    pub async fn options(&self, name: &str) -> Result<ConnectOptions> {
        let (me, url) = (name.to_string(), redact(&self.url));
        // Before the first connection, errors mean "not up yet" (processes started together).
        let connected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut opts = ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let (me, url, connected) = (me.clone(), url.clone(), connected.clone());
                async move {
                match event {
                    Event::ServerError(ServerError::AuthorizationViolation) => {
                        // A wrong or missing credential never heals by retrying.
                        tracing::error!("NATS refused this process's credentials (authorization violation); exiting: check --nats-creds, --nats-user/--nats-password or --nats-token");
                        std::process::exit(2);
                    }
                    Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                    Event::ClientError(e) if !connected.load(std::sync::atomic::Ordering::Relaxed) => {
                        tracing::info!(nats = %url, error = %e, "waiting for NATS")
                    }
                    Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
                    Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    Event::Connected => {
                        connected.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(name = %me, nats = %url, "connected to NATS")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
                }
            });
        match self.auth()? {
            Auth::None => {}
            Auth::Creds(path) => {
                readable(&path, "--nats-creds")?;
                opts = opts.credentials_file(&path).await.with_context(|| {
                    format!(
                        "--nats-creds {}: not a NATS credentials file",
                        path.display()
                    )
                })?;
            }
            Auth::UserPassword(u, p) => opts = opts.user_and_password(u, p),
            Auth::Token(t) => opts = opts.token(t),
        }
        let tls_url = self.url.starts_with("tls://");
        if let Some(ca) = &self.nats_tls_ca {
            readable(ca, "--nats-tls-ca")?;
            opts = opts.add_root_certificates(ca.clone());
        }
        match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(cert), Some(key)) => {
                readable(cert, "--nats-tls-cert")?;
                readable(key, "--nats-tls-key")?;
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
            (Some(_), None) => bail!("--nats-tls-cert needs --nats-tls-key"),
            (None, Some(_)) => bail!("--nats-tls-key needs --nats-tls-cert"),
            (None, None) => {}
        }
        if tls_url || self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some() {
            opts = opts.require_tls(true);
        }
        Ok(opts)
    }

    /// Connects (waiting for a server that is not up yet, reconnecting for ever).
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        let opts = self.options(name).await?;
        opts.connect(self.dial_url())
            .await
            .with_context(|| format!("connecting to NATS at {}", redact(&self.url)))
    }
}

fn readable(path: &Path, flag: &str) -> Result<()> {
    std::fs::metadata(path)
        .with_context(|| format!("{flag} {}: cannot read the file", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> NatsArgs {
        NatsArgs {
            url: url.into(),
            nats_creds: None,
            nats_user: None,
            nats_password: None,
            nats_token: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
        }
    }

    #[test]
    fn credentials_come_from_one_place_and_never_show() {
        let a = args("nats://alice:p%40ss@nats:4222");
        assert_eq!(
            a.auth().expect("valid"),
            Auth::UserPassword("alice".into(), "p@ss".into())
        );
        assert_eq!(a.dial_url(), "nats://nats:4222");
        assert!(!format!("{a:?}").contains("p%40ss"));
        assert_eq!(
            args("nats://s3cret@nats:4222").auth().expect("valid"),
            Auth::Token("s3cret".into())
        );
        assert_eq!(args("tls://nats:4222").auth().expect("valid"), Auth::None);
        let mut both = args("nats://alice:x@nats:4222");
        both.nats_token = Some("t".into());
        let e = both.auth().expect_err("two ways").to_string();
        assert!(e.contains("(a token, a user and password)"), "{e}");
        let mut half = args("nats://nats:4222");
        half.nats_user = Some("bob".into());
        assert!(half
            .auth()
            .expect_err("no password")
            .to_string()
            .contains("--nats-password"));
        half.nats_password = Some("hunter2".into());
        assert_eq!(
            half.auth().expect("valid"),
            Auth::UserPassword("bob".into(), "hunter2".into())
        );
        assert!(!format!("{half:?}").contains("hunter2"));
        assert!(!format!("{:?}", half.auth().expect("valid")).contains("hunter2"));
        assert_eq!(redact("nats://u:p@h:1"), "nats://<credentials>@h:1");
        assert_eq!(redact("nats://h:1"), "nats://h:1");
    }

    #[tokio::test]
    async fn missing_files_are_named() {
        let mut a = args("nats://nats:4222");
        a.nats_tls_ca = Some("/nonexistent/ca.pem".into());
        let e = a.options("t").await.expect_err("missing").to_string();
        assert!(e.contains("--nats-tls-ca /nonexistent/ca.pem"), "{e}");
        let mut a = args("nats://nats:4222");
        a.nats_tls_cert = Some("/etc/hostname".into());
        let e = a.options("t").await.expect_err("half").to_string();
        assert!(e.contains("--nats-tls-cert needs --nats-tls-key"), "{e}");
        let mut a = args("nats://nats:4222");
        a.nats_creds = Some("/etc/hostname".into());
        let e = format!("{:#}", a.options("t").await.expect_err("not creds"));
        assert!(e.contains("not a NATS credentials file"), "{e}");
    }
}
