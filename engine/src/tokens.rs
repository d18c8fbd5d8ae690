//! Queue tokens: `v1.<schedule>.<user>.<seq>.<mac>`, signed with HMAC-SHA256 so that a
//! client cannot forge or alter one. The token names its schedule, user and place in line;
//! its status lives in the cache store.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::{ScheduleId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// What a verified token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueClaim {
    pub schedule_id: ScheduleId,
    pub user_id: UserId,
    pub seq: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed queue token")]
    Malformed,
    #[error("queue token signature does not match")]
    BadSignature,
}

/// Signs and verifies queue tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    /// The HMAC keyed with the secret, cloned for each token: keying hashes the secret's pads,
    /// which would otherwise be done again for every request.
    keyed: HmacSha256,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A signer with `secret` (at least 16 bytes; checked by the configuration).
    pub fn new(secret: &[u8]) -> Self {
        let keyed =
            HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { keyed }
    }

    /// The token for a claim.
    pub fn sign(&self, claim: QueueClaim) -> String {
        let payload = format!("v1.{}.{}.{}", claim.schedule_id, claim.user_id, claim.seq);
        let mac = URL_SAFE_NO_PAD.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{mac}")
    }

    /// The claim of a token, if it was signed with this secret.
    pub fn verify(&self, token: &str) -> Result<QueueClaim, TokenError> {
        let (payload, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| TokenError::Malformed)?;
        self.mac(payload.as_bytes()).verify_slice(&mac).map_err(|_| TokenError::BadSignature)?;
        let mut parts = payload.split('.');
        let (Some("v1"), Some(schedule), Some(user), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let number = |text: &str| text.parse::<u64>().map_err(|_| TokenError::Malformed);
        Ok(QueueClaim { schedule_id: number(schedule)?, user_id: number(user)?, seq: number(seq)? })
    }

    fn mac(&self, payload: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(payload);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAIM: QueueClaim = QueueClaim { schedule_id: 3, user_id: 42, seq: 7 };

    #[test]
    fn a_signed_token_verifies_to_its_claim() {
        let signer = TokenSigner::new(b"0123456789abcdef");
        assert_eq!(signer.verify(&signer.sign(CLAIM)), Ok(CLAIM));
    }

    #[test]
    fn altered_or_foreign_tokens_are_refused() {
        let signer = TokenSigner::new(b"0123456789abcdef");
        let token = signer.sign(CLAIM);
        let altered = token.replacen("v1.3.42", "v1.3.43", 1);
        assert_eq!(signer.verify(&altered), Err(TokenError::BadSignature));
        let foreign = TokenSigner::new(b"another-secret-key!").sign(CLAIM);
        assert_eq!(signer.verify(&foreign), Err(TokenError::BadSignature));
        assert_eq!(signer.verify("garbage"), Err(TokenError::Malformed));
        assert_eq!(signer.verify("v1.3.42.7.%%%"), Err(TokenError::Malformed));
    }
}
