//! [`AccessRules`]: an ordered list of allow/deny rules, checked first match wins.

use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use ipnet::IpNet;

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// nginx `allow`.
    Allow,
    /// nginx `deny`.
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    action: Action,
    /// `None` is `all`.
    net: Option<IpNet>,
}

/// The rules of one location or server; cheap to clone (shared behind an `Arc`).
#[derive(Debug, Clone)]
pub struct AccessRules {
    rules: Arc<[Rule]>,
    status: StatusCode,
}

/// Builds [`AccessRules`] in nginx's order: the first rule that matches decides.
#[derive(Debug, Clone)]
#[must_use]
pub struct AccessRulesBuilder {
    rules: Vec<Rule>,
    status: StatusCode,
}

impl AccessRules {
    /// An empty list (everything allowed) to add rules to.
    pub fn builder() -> AccessRulesBuilder {
        AccessRulesBuilder {
            rules: Vec::new(),
            status: StatusCode::FORBIDDEN,
        }
    }

    /// What the rules decide for a client address (`None`: unknown, matches only `all`).
    pub fn decide(&self, ip: Option<IpAddr>) -> Action {
        let ip = ip.map(|ip| ip.to_canonical());
        for rule in self.rules.iter() {
            let hit = match (rule.net, ip) {
                (None, _) => true,
                (Some(net), Some(ip)) => net.contains(&ip),
                (Some(_), None) => false,
            };
            if hit {
                return rule.action;
            }
        }
        Action::Allow
    }

    /// The status a denied request is answered with.
    pub fn deny_status(&self) -> StatusCode {
        self.status
    }
}

impl AccessRulesBuilder {
    /// nginx `allow NET` (a single address is a /32 or /128 network).
    pub fn allow(mut self, net: IpNet) -> Self {
        self.rules.push(Rule {
            action: Action::Allow,
            net: Some(net.trunc()),
        });
        self
    }

    /// nginx `deny NET`.
    pub fn deny(mut self, net: IpNet) -> Self {
        self.rules.push(Rule {
            action: Action::Deny,
            net: Some(net.trunc()),
        });
        self
    }

    /// nginx `allow all`.
    pub fn allow_all(mut self) -> Self {
        self.rules.push(Rule {
            action: Action::Allow,
            net: None,
        });
        self
    }

    /// nginx `deny all`.
    pub fn deny_all(mut self) -> Self {
        self.rules.push(Rule {
            action: Action::Deny,
            net: None,
        });
        self
    }

    /// Answer denied requests with `status` instead of 403 (e.g. 404 to hide that the
    /// path exists, as the seed's `deny all; return 404;` intends).
    pub fn deny_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The finished, shareable rules.
    pub fn build(self) -> AccessRules {
        AccessRules {
            rules: self.rules.into(),
            status: self.status,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn first_match_wins_and_default_allows() {
        let r = AccessRules::builder()
            .deny("192.168.1.1/32".parse().unwrap())
            .allow("192.168.1.0/24".parse().unwrap())
            .allow("2001:db8::/32".parse().unwrap())
            .deny_all()
            .build();
        assert_eq!(r.decide(ip("192.168.1.1")), Action::Deny);
        assert_eq!(r.decide(ip("192.168.1.2")), Action::Allow);
        assert_eq!(r.decide(ip("2001:db8::1")), Action::Allow);
        assert_eq!(r.decide(ip("10.0.0.1")), Action::Deny);
        assert_eq!(r.decide(None), Action::Deny);
        assert_eq!(
            AccessRules::builder().build().decide(ip("1.2.3.4")),
            Action::Allow
        );
        let only_deny = AccessRules::builder()
            .deny("1.2.3.4/32".parse().unwrap())
            .build();
        assert_eq!(only_deny.decide(None), Action::Allow);
        assert_eq!(only_deny.decide(ip("1.2.3.5")), Action::Allow);
    }

    #[test]
    fn mapped_ipv6_matches_ipv4_rules_and_host_bits_are_ignored() {
        let r = AccessRules::builder()
            .allow("10.1.2.3/8".parse().unwrap())
            .deny_all()
            .build();
        assert_eq!(r.decide(ip("::ffff:10.200.0.1")), Action::Allow);
        assert_eq!(r.decide(ip("10.200.0.1")), Action::Allow);
        assert_eq!(r.decide(ip("::ffff:11.0.0.1")), Action::Deny);
    }

    proptest! {
        /// Against a straightforward model: the first rule containing the address decides.
        #[test]
        fn matches_model(addrs in proptest::collection::vec((any::<u32>(), 0u8..=32, any::<bool>()), 0..8),
                         probe in any::<u32>()) {
            let mut b = AccessRules::builder();
            let mut model = Vec::new();
            for (a, len, allow) in &addrs {
                let net = IpNet::new(IpAddr::from(a.to_be_bytes()), *len).unwrap();
                b = if *allow { b.allow(net) } else { b.deny(net) };
                model.push((net, *allow));
            }
            let r = b.build();
            let p = IpAddr::from(probe.to_be_bytes());
            let want = model.iter().find(|(n, _)| n.contains(&p)).is_none_or(|(_, a)| *a);
            prop_assert_eq!(r.decide(Some(p)) == Action::Allow, want);
        }
    }
}
