//! Fan sessions: a signed, expiring JWT whose `sub` names the user. Every call that acts for a
//! user takes the user from a verified session, never from a body or a path.
//!
//! The engine verifies HS256 (a secret it shares with whoever issues sessions: itself, the
//! testbed, an identity provider) or, with only a public key, EdDSA or RS256, so that a real
//! identity provider can issue sessions the engine can check but not mint. Expiry is judged
//! on the engine's clock (never the host's), with a small leeway, so a simulated run replays.
//!
//! **Invariant:** a [`Session`] exists only as the result of [`Sessions::verify`] (or of
//! [`Sessions::issue`] in tests and dev mode): holding one proves the signature, audience,
//! issuer and expiry were checked.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::domain::UserId;

/// The audience sessions are for, unless configured otherwise.
pub const SESSION_AUDIENCE_DEFAULT: &str = "tcore";
/// How long a session the engine issues lasts.
pub const SESSION_TTL_S_DEFAULT: u64 = 3_600;
/// How far a session's `exp` and `nbf` may be off the engine's clock (clock skew between the
/// issuer and the engine).
pub const SESSION_LEEWAY_S: u64 = 30;
/// The longest session credential read; a longer one is refused unread.
pub const SESSION_LEN_MAX: usize = 4_096;
/// The longest a session may be issued for (a day).
pub const SESSION_TTL_S_MAX: u64 = 86_400;
/// The most verified sessions a node remembers (about 30 MB at the longest credential); when
/// full it forgets them all and verifies again.
pub const VERIFIED_SESSIONS_MAX: usize = 100_000;

/// A verified session: the user it names and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub user_id: UserId,
    pub expires_at_s: u64,
}

/// Why a session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("this call needs a session: `Authorization: Bearer <session>`")]
    Missing,
    #[error("the session is not valid: {0}")]
    Invalid(&'static str),
    #[error("the session has expired")]
    Expired,
}

/// The key sessions are checked with.
#[derive(Clone, PartialEq, Eq)]
pub enum SessionKey {
    /// HS256 with a shared secret (at least 32 bytes): the engine can issue sessions too.
    Hs256 { secret: Vec<u8> },
    /// EdDSA (Ed25519) with a public key in PEM: verify only.
    EdDsa { public_key_pem: Vec<u8> },
    /// RS256 with a public key in PEM: verify only.
    Rs256 { public_key_pem: Vec<u8> },
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionKey::Hs256 { .. } => "Hs256(..)",
            SessionKey::EdDsa { .. } => "EdDsa(..)",
            SessionKey::Rs256 { .. } => "Rs256(..)",
        })
    }
}

/// How sessions are checked and issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub key: SessionKey,
    /// The `aud` a session must carry.
    pub audience: String,
    /// The `iss` a session must carry, if set.
    pub issuer: Option<String>,
    /// How long sessions the engine issues last.
    pub ttl_s: u64,
    /// Serve `POST /v1/sessions`, which issues a session for any existing user without proof
    /// of identity: for development and load tests only.
    pub dev_sessions: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            key: SessionKey::Hs256 { secret: b"tcore-development-session-secret".to_vec() },
            audience: SESSION_AUDIENCE_DEFAULT.into(),
            issuer: None,
            ttl_s: SESSION_TTL_S_DEFAULT,
            dev_sessions: false,
        }
    }
}

/// The claims the engine writes into the sessions it issues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// What the engine reads of a session it verifies; other claims are ignored.
#[derive(Debug, Deserialize)]
struct ReadClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
}

/// Verifies sessions, and issues them when the key allows.
///
/// A fan sends the same session with every call, and decoding and checking a JWT costs more
/// than the rest of a queue poll, so the sessions verified are remembered by their exact
/// text. Only a credential that verified is remembered (a forged one never is), a remembered
/// one is still judged against its `exp` on every call, and the memory is bounded by
/// [`VERIFIED_SESSIONS_MAX`]. Its order is never read, so a simulated run stays the same.
pub struct Sessions {
    decoding: DecodingKey,
    validation: Validation,
    /// Present with an HS256 secret only.
    encoding: Option<EncodingKey>,
    audience: String,
    issuer: Option<String>,
    ttl_s: u64,
    verified: Mutex<HashMap<Box<str>, Session>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("audience", &self.audience).finish_non_exhaustive()
    }
}

/// The shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash's size).
pub const SESSION_SECRET_LEN_MIN: usize = 32;

impl Sessions {
    /// Sessions as `config` says; refuses a weak secret or an unreadable public key.
    pub fn new(config: &SessionConfig) -> Result<Self, ConfigError> {
        let bad_key = |reason: String| ConfigError::SessionKey { reason };
        let (algorithm, decoding, encoding) = match &config.key {
            SessionKey::Hs256 { secret } => {
                if secret.len() < SESSION_SECRET_LEN_MIN {
                    return Err(bad_key(format!("an HS256 secret needs at least {SESSION_SECRET_LEN_MIN} bytes")));
                }
                let decoding = DecodingKey::from_secret(secret).map_err(|error| bad_key(error.to_string()))?;
                let encoding = EncodingKey::from_secret(secret).map_err(|error| bad_key(error.to_string()))?;
                (Algorithm::HS256, decoding, Some(encoding))
            }
            SessionKey::EdDsa { public_key_pem } => {
                let decoding = DecodingKey::from_ed_pem(public_key_pem)
                    .map_err(|error| bad_key(format!("not an Ed25519 public key in PEM: {error}")))?;
                (Algorithm::EdDSA, decoding, None)
            }
            SessionKey::Rs256 { public_key_pem } => {
                let decoding = DecodingKey::from_rsa_pem(public_key_pem)
                    .map_err(|error| bad_key(format!("not an RSA public key in PEM: {error}")))?;
                (Algorithm::RS256, decoding, None)
            }
        };
        if !(1..=SESSION_TTL_S_MAX).contains(&config.ttl_s) {
            return Err(bad_key(format!("the session TTL must be 1 to {SESSION_TTL_S_MAX} s")));
        }
        if config.dev_sessions && encoding.is_none() {
            return Err(bad_key("dev sessions need an HS256 secret: a public key cannot sign".into()));
        }
        let mut validation = Validation::new(algorithm);
        // Expiry is judged on the engine's clock below, never on the host's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.set_audience(&[config.audience.as_str()]);
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer.as_str()]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Self {
            decoding,
            validation,
            encoding,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            ttl_s: config.ttl_s,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The session `credential` proves, at `now_ms` on the engine's clock.
    pub fn verify(&self, credential: &str, now_ms: u64) -> Result<Session, SessionError> {
        use jsonwebtoken::errors::ErrorKind;
        if credential.len() > SESSION_LEN_MAX {
            return Err(SessionError::Invalid("too long"));
        }
        let remembered = self.verified.lock().get(credential).copied();
        if let Some(session) = remembered {
            return judge_expiry(session, now_ms);
        }
        let claims = jsonwebtoken::decode::<ReadClaims>(credential, &self.decoding, &self.validation)
            .map_err(|error| {
                SessionError::Invalid(match error.kind() {
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "wrong algorithm",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    _ => "malformed",
                })
            })?
            .claims;
        let now_s = now_ms / 1000;
        if claims.nbf.is_some_and(|nbf| nbf > now_s.saturating_add(SESSION_LEEWAY_S)) {
            return Err(SessionError::Invalid("not valid yet"));
        }
        let user_id = claims.sub.parse::<UserId>().ok().filter(|&id| id > 0);
        let user_id = user_id.ok_or(SessionError::Invalid("the subject is not a user id"))?;
        let session = judge_expiry(Session { user_id, expires_at_s: claims.exp }, now_ms)?;
        // Not yet valid sessions are never remembered, so a remembered one needs no `nbf`.
        let mut verified = self.verified.lock();
        if verified.len() >= VERIFIED_SESSIONS_MAX {
            verified.clear();
        }
        verified.insert(credential.into(), session);
        Ok(session)
    }

    /// How many verified sessions are remembered.
    pub fn remembered(&self) -> usize {
        self.verified.lock().len()
    }

    /// A session for `user_id` from `now_ms`, lasting the configured TTL; `None` when the key
    /// is a public key, which cannot sign.
    pub fn issue(&self, user_id: UserId, now_ms: u64) -> Option<(String, Session)> {
        let encoding = self.encoding.as_ref()?;
        let iat = now_ms / 1000;
        let claims = SessionClaims {
            sub: user_id.to_string(),
            aud: self.audience.clone(),
            iat,
            exp: iat + self.ttl_s,
            iss: self.issuer.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding).ok()?;
        Some((token, Session { user_id, expires_at_s: claims.exp }))
    }
}

/// `session` unless it expired by `now_ms` (with the leeway).
fn judge_expiry(session: Session, now_ms: u64) -> Result<Session, SessionError> {
    if session.expires_at_s.saturating_add(SESSION_LEEWAY_S) <= now_ms / 1000 {
        return Err(SessionError::Expired);
    }
    Ok(session)
}

/// Signs `claims` with an HS256 `secret`: how scripts and the testbed log fans in.
pub fn sign_hs256(secret: &[u8], claims: &SessionClaims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a-session-secret-of-32-bytes-min";
    const NOW_MS: u64 = 1_800_000_000_000;

    fn sessions(config: SessionConfig) -> Sessions {
        Sessions::new(&config).unwrap_or_else(|error| panic!("valid config: {error}"))
    }

    fn hs256() -> SessionConfig {
        SessionConfig { key: SessionKey::Hs256 { secret: SECRET.to_vec() }, ..SessionConfig::default() }
    }

    fn claims(sub: &str, exp: u64) -> SessionClaims {
        SessionClaims { sub: sub.into(), aud: SESSION_AUDIENCE_DEFAULT.into(), iat: NOW_MS / 1000, exp, iss: None }
    }

    fn check(token: &str, expected: Result<Session, SessionError>) {
        assert_eq!(sessions(hs256()).verify(token, NOW_MS), expected, "token {token}");
    }

    fn signed(claims: &SessionClaims) -> String {
        sign_hs256(SECRET, claims).expect("signs")
    }

    #[test]
    fn an_issued_session_verifies_to_its_user() {
        let sessions = sessions(hs256());
        let (token, session) = sessions.issue(42, NOW_MS).expect("HS256 can issue");
        assert_eq!(session.user_id, 42);
        assert_eq!(sessions.verify(&token, NOW_MS), Ok(session));
        assert_eq!(session.expires_at_s, NOW_MS / 1000 + SESSION_TTL_S_DEFAULT);
    }

    #[test]
    fn expiry_is_judged_on_the_given_clock_with_leeway() {
        let exp = NOW_MS / 1000 + 10;
        let token = signed(&claims("7", exp));
        let sessions = sessions(hs256());
        assert!(sessions.verify(&token, NOW_MS).is_ok());
        assert!(sessions.verify(&token, (exp + SESSION_LEEWAY_S - 1) * 1000).is_ok());
        assert_eq!(sessions.verify(&token, (exp + SESSION_LEEWAY_S) * 1000), Err(SessionError::Expired), "remembered");
        let fresh = self::sessions(hs256());
        assert_eq!(fresh.verify(&token, (exp + SESSION_LEEWAY_S) * 1000), Err(SessionError::Expired), "decoded");
    }

    #[test]
    fn forged_foreign_and_other_audience_sessions_are_refused() {
        let good = signed(&claims("7", NOW_MS / 1000 + 60));
        let (head, rest) = good.split_once('.').expect("three parts");
        let (_, signature) = rest.split_once('.').expect("three parts");
        let other_user = signed(&claims("8", NOW_MS / 1000 + 60));
        let other_payload = other_user.split('.').nth(1).expect("payload");
        check(&format!("{head}.{other_payload}.{signature}"), Err(SessionError::Invalid("bad signature")));
        let foreign = sign_hs256(b"another-secret-of-at-least-32-bytes", &claims("7", NOW_MS / 1000 + 60));
        check(&foreign.expect("signs"), Err(SessionError::Invalid("bad signature")));
        let mut elsewhere = claims("7", NOW_MS / 1000 + 60);
        elsewhere.aud = "another-service".into();
        check(&signed(&elsewhere), Err(SessionError::Invalid("wrong audience")));
        check("garbage", Err(SessionError::Invalid("malformed")));
        check(
            &signed(&claims("admin", NOW_MS / 1000 + 60)),
            Err(SessionError::Invalid("the subject is not a user id")),
        );
        check(&signed(&claims("0", NOW_MS / 1000 + 60)), Err(SessionError::Invalid("the subject is not a user id")));
        check(&"a".repeat(SESSION_LEN_MAX + 1), Err(SessionError::Invalid("too long")));
    }

    #[test]
    fn an_unsigned_session_is_refused() {
        // `alg: none` with the claims of a valid session and no signature.
        use base64::Engine as _;
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let claims = serde_json::to_string(&claims("7", NOW_MS / 1000 + 60)).expect("json");
        let token = format!("{}.{}.", encode(r#"{"alg":"none","typ":"JWT"}"#), encode(&claims));
        assert!(matches!(sessions(hs256()).verify(&token, NOW_MS), Err(SessionError::Invalid(_))));
    }

    #[test]
    fn a_required_issuer_must_match() {
        let config = SessionConfig { issuer: Some("https://id.example".into()), ..hs256() };
        let sessions = sessions(config);
        let (issued, _) = sessions.issue(5, NOW_MS).expect("issues");
        assert!(sessions.verify(&issued, NOW_MS).is_ok());
        let without = signed(&claims("5", NOW_MS / 1000 + 60));
        assert_eq!(sessions.verify(&without, NOW_MS), Err(SessionError::Invalid("a required claim is missing")));
    }

    #[test]
    fn weak_secrets_and_bad_public_keys_are_refused_at_start() {
        let weak = SessionConfig { key: SessionKey::Hs256 { secret: b"short".to_vec() }, ..hs256() };
        assert!(Sessions::new(&weak).is_err());
        let bad_pem = SessionConfig { key: SessionKey::EdDsa { public_key_pem: b"not a key".to_vec() }, ..hs256() };
        assert!(Sessions::new(&bad_pem).is_err());
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/session-keys/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    /// A public-key session configuration verifies what its private key signed, cannot issue,
    /// and is not fooled by an HS256 session keyed with the public key's own bytes.
    fn check_public_key(key: SessionKey, algorithm: Algorithm, signing: EncodingKey, public_pem: &[u8]) {
        let sessions = sessions(SessionConfig { key, ..hs256() });
        let token = jsonwebtoken::encode(&Header::new(algorithm), &claims("9", NOW_MS / 1000 + 60), &signing);
        assert_eq!(sessions.verify(&token.expect("signs"), NOW_MS).map(|s| s.user_id), Ok(9));
        assert!(sessions.issue(9, NOW_MS).is_none());
        let confused = sign_hs256(public_pem, &claims("9", NOW_MS / 1000 + 60)).expect("signs");
        assert_eq!(sessions.verify(&confused, NOW_MS), Err(SessionError::Invalid("wrong algorithm")));
    }

    #[test]
    fn an_ed25519_public_key_verifies_its_private_keys_sessions() {
        let public_key_pem = fixture("ed25519-public.pem");
        let signing = EncodingKey::from_ed_pem(&fixture("ed25519-private.pem")).expect("private key");
        check_public_key(
            SessionKey::EdDsa { public_key_pem: public_key_pem.clone() },
            Algorithm::EdDSA,
            signing,
            &public_key_pem,
        );
    }

    #[test]
    fn an_rsa_public_key_verifies_its_private_keys_sessions() {
        let public_key_pem = fixture("rsa-public.pem");
        let signing = EncodingKey::from_rsa_pem(&fixture("rsa-private.pem")).expect("private key");
        check_public_key(
            SessionKey::Rs256 { public_key_pem: public_key_pem.clone() },
            Algorithm::RS256,
            signing,
            &public_key_pem,
        );
    }
}
