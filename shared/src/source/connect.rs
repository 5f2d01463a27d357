//! Opening a session: TLS as libpq's `sslmode` means it, session settings every pgshift
//! session carries, and connection failures classified (dns, refused, timeout, tls, auth, ...).
//!
//! Every session sets `application_name`, `statement_timeout`, `lock_timeout`, `timezone=UTC`,
//! ISO dates and exact float output in the startup packet, so no extra round trip is needed and
//! text values (full load and CDC alike) come out the same on every server.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PgConfig, SslMode};
use crate::error::{ConnectFailure, Error, Result};

/// Opens a session with pgshift's settings. The whole attempt (DNS, TCP, TLS, auth) is bounded
/// by twice the configured connect timeout, so a server that accepts TCP and then says nothing
/// is a timeout too.
pub async fn connect(cfg: &PgConfig) -> Result<Client> {
    let target = cfg.target();
    let connect_err = |kind: ConnectFailure, detail: String| Error::Connect {
        kind,
        target: target.clone(),
        detail,
    };
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(&cfg.application_name)
        .connect_timeout(cfg.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .options(session_options(cfg));
    if let Some(pw) = cfg.password_bytes() {
        pg.password(pw);
    }
    pg.ssl_mode(match cfg.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    let tls = MakeRustlsConnect::new(tls_config(cfg)?);
    let budget = cfg.connect_timeout * 2;
    let (client, connection) = match tokio::time::timeout(budget, pg.connect(tls)).await {
        Err(_) => {
            return Err(connect_err(
                ConnectFailure::Timeout,
                format!(
                    "no session after {}s (network, TLS or authentication hung)",
                    budget.as_secs()
                ),
            ));
        }
        Ok(Err(e)) => {
            let (kind, detail) = classify(&e);
            return Err(connect_err(kind, detail));
        }
        Ok(Ok(pair)) => pair,
    };
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "postgres connection ended");
        }
    });
    Ok(client)
}

fn session_options(cfg: &PgConfig) -> String {
    format!(
        "-c statement_timeout={} -c lock_timeout={} -c timezone=UTC -c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3",
        cfg.statement_timeout.as_millis(),
        cfg.lock_timeout.as_millis()
    )
}

/// Classifies a failed connection attempt by its SQLSTATE or its I/O cause.
pub(crate) fn classify(err: &tokio_postgres::Error) -> (ConnectFailure, String) {
    if let Some(db) = err.as_db_error() {
        let kind = match db.code().code() {
            "28P01" | "28000" => ConnectFailure::Auth,
            "3D000" => ConnectFailure::Database,
            "53300" | "57P03" | "53000" => ConnectFailure::Unavailable,
            _ => ConnectFailure::Other,
        };
        return (
            kind,
            format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        );
    }
    let mut chain = vec![err.to_string()];
    let mut io_kind = None;
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        if let Some(ioe) = c.downcast_ref::<io::Error>() {
            io_kind.get_or_insert(ioe.kind());
        }
        chain.push(c.to_string());
        cause = c.source();
    }
    let detail = chain.join(": ");
    let lower = detail.to_ascii_lowercase();
    let kind =
        if lower.contains("tls") || lower.contains("certificate") || lower.contains("handshake") {
            ConnectFailure::Tls
        } else if lower.contains("lookup address")
            || lower.contains("name or service not known")
            || lower.contains("no address associated")
            || lower.contains("nodename nor servname")
            || lower.contains("temporary failure in name resolution")
        {
            ConnectFailure::Dns
        } else {
            match io_kind {
                Some(io::ErrorKind::ConnectionRefused) => ConnectFailure::Refused,
                Some(io::ErrorKind::TimedOut) => ConnectFailure::Timeout,
                _ if lower.contains("timed out") => ConnectFailure::Timeout,
                _ if lower.contains("password") => ConnectFailure::Auth,
                _ => ConnectFailure::Other,
            }
        };
    (kind, detail)
}

/// The rustls client configuration for a `sslmode`. Only the aws-lc-rs provider is used,
/// explicitly, because the AWS SDK also links rustls and two providers make the implicit
/// builder panic.
fn tls_config(cfg: &PgConfig) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("sslmode", format!("tls setup failed: {e}")))?;
    let algs = provider.signature_verification_algorithms;
    let config = match cfg.sslmode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert { algs }))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(root_store(cfg)?);
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| {
                    Error::config("sslrootcert", format!("no usable CA certificates: {e}"))
                })?;
            let verifier: Arc<dyn ServerCertVerifier> = if cfg.sslmode == SslMode::VerifyCa {
                Arc::new(ChainOnly { inner })
            } else {
                inner
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// The certificate authorities of Amazon RDS and Aurora, every region (`shared/certs/`).
const RDS_CA_BUNDLE: &[u8] = include_bytes!("../../certs/rds-ca-bundle.pem");

/// The built-in RDS certificate authorities.
pub(crate) fn rds_roots() -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(RDS_CA_BUNDLE)
        .filter_map(|c| c.ok())
        .collect()
}

/// The public web roots, the RDS certificate authorities, and the certificates of
/// `sslrootcert` (a file, or PEM text from a secret).
fn root_store(cfg: &PgConfig) -> Result<RootCertStore> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    roots.add_parsable_certificates(rds_roots());
    if let Some(pem) = &cfg.sslrootcert_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| {
                Error::config(
                    "sslrootcert",
                    format!("the PEM text is not certificates: {e}"),
                )
            })?;
            roots.add(cert).map_err(|e| {
                Error::config(
                    "sslrootcert",
                    format!("bad certificate in the PEM text: {e}"),
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::config(
                "sslrootcert",
                "the PEM text holds no certificates",
            ));
        }
    }
    if let Some(path) = &cfg.sslrootcert {
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
            Error::config(
                "sslrootcert",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| {
                Error::config(
                    "sslrootcert",
                    format!("{} is not PEM certificates: {e}", path.display()),
                )
            })?;
            roots.add(cert).map_err(|e| {
                Error::config(
                    "sslrootcert",
                    format!("bad certificate in {}: {e}", path.display()),
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::config(
                "sslrootcert",
                format!("{} holds no certificates", path.display()),
            ));
        }
    }
    Ok(roots)
}

/// `sslmode=require`: encrypt, do not authenticate the server (libpq's meaning).
#[derive(Debug)]
struct AcceptAnyCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rds_certificate_authorities_are_built_in() {
        let rds = rds_roots();
        assert!(rds.len() >= 80, "{} certificates", rds.len());
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(rds);
        assert_eq!(ignored, 0, "unparsable RDS certificates");
        assert_eq!(added, store.len());
        // verify-full builds a verifier with them and the web roots.
        let mut cfg = PgConfig::new("db.abc.eu-west-1.rds.amazonaws.com", 5432, "u", "d");
        cfg.sslmode = SslMode::VerifyFull;
        assert!(root_store(&cfg).unwrap().len() > added);
        assert!(tls_config(&cfg).is_ok());
    }

    #[test]
    fn pem_text_that_is_not_certificates_is_a_named_error() {
        let mut cfg = PgConfig::new("h", 5432, "u", "d");
        cfg.sslmode = SslMode::VerifyFull;
        cfg.sslrootcert_pem =
            Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into());
        let err = root_store(&cfg).unwrap_err().to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(!err.contains("AAAA"), "{err}");
    }
}
