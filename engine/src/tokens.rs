//! Queue tokens: `v2.<schedule>.<user>.<seq>.<nonce>.<mac>`, signed with HMAC-SHA256 so that a
//! client cannot forge or alter one. The token names its schedule, user and place in line;
//! its status lives in the cache store. A token is a capability bound to its user: every call
//! that presents one also presents the user's session, and the two must name the same user.
//!
//! The nonce makes every issued token distinct (a second join by the same user returns the
//! same place under a new token): it is a keyed function of the issuing node and a per-node
//! count, so it cannot be predicted without the secret and a simulated run still replays.

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
    pub nonce: u64,
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

    /// A nonce for the `issue`-th token issued by `node`.
    pub fn nonce(&self, node: &str, issue: u64) -> u64 {
        let mut mac = self.mac(b"nonce\0");
        mac.update(node.as_bytes());
        mac.update(&issue.to_le_bytes());
        let bytes = mac.finalize().into_bytes();
        u64::from_le_bytes(bytes[..8].try_into().unwrap_or_else(|_| unreachable!("a SHA-256 MAC has 32 bytes")))
    }

    /// The token for a claim.
    pub fn sign(&self, claim: QueueClaim) -> String {
        let payload = format!("v2.{}.{}.{}.{:016x}", claim.schedule_id, claim.user_id, claim.seq, claim.nonce);
        let mac = URL_SAFE_NO_PAD.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{mac}")
    }

    /// The claim of a token, if it was signed with this secret.
    pub fn verify(&self, token: &str) -> Result<QueueClaim, TokenError> {
        let (payload, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| TokenError::Malformed)?;
        self.mac(payload.as_bytes()).verify_slice(&mac).map_err(|_| TokenError::BadSignature)?;
        let mut parts = payload.split('.');
        let (Some("v2"), Some(schedule), Some(user), Some(seq), Some(nonce), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let number = |text: &str| text.parse::<u64>().map_err(|_| TokenError::Malformed);
        let nonce = u64::from_str_radix(nonce, 16).map_err(|_| TokenError::Malformed)?;
        Ok(QueueClaim { schedule_id: number(schedule)?, user_id: number(user)?, seq: number(seq)?, nonce })
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

    const CLAIM: QueueClaim = QueueClaim { schedule_id: 3, user_id: 42, seq: 7, nonce: 0xfeed };

    #[test]
    fn a_signed_token_verifies_to_its_claim() {
        let signer = TokenSigner::new(b"0123456789abcdef");
        assert_eq!(signer.verify(&signer.sign(CLAIM)), Ok(CLAIM));
    }

    #[test]
    fn altered_or_foreign_tokens_are_refused() {
        let signer = TokenSigner::new(b"0123456789abcdef");
        let token = signer.sign(CLAIM);
        let altered = token.replacen("v2.3.42", "v2.3.43", 1);
        assert_eq!(signer.verify(&altered), Err(TokenError::BadSignature));
        let foreign = TokenSigner::new(b"another-secret-key!").sign(CLAIM);
        assert_eq!(signer.verify(&foreign), Err(TokenError::BadSignature));
        assert_eq!(signer.verify("garbage"), Err(TokenError::Malformed));
        assert_eq!(signer.verify("v2.3.42.7.1.%%%"), Err(TokenError::Malformed));
    }

    #[test]
    fn nonces_differ_per_issue_and_per_node() {
        let signer = TokenSigner::new(b"0123456789abcdef");
        let nonces = [signer.nonce("engine-1", 1), signer.nonce("engine-1", 2), signer.nonce("engine-2", 1)];
        assert_ne!(nonces[0], nonces[1]);
        assert_ne!(nonces[0], nonces[2]);
        assert_eq!(signer.nonce("engine-1", 1), nonces[0], "a keyed function, not a random draw");
        assert_ne!(TokenSigner::new(b"another-secret-key!").nonce("engine-1", 1), nonces[0]);
    }
}
