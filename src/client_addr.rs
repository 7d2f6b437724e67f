//! Who a request came from, behind a load balancer: the address in `X-Forwarded-For` that the
//! trusted proxies (`server.trusted_proxies`) vouch for, else the connection's peer.
//!
//! Behind a balancer every connection's peer is the balancer, so the audit log's "where from"
//! would name it for every caller, breach detection's `many_addresses` could never fire, and
//! every unauthenticated refusal would share one window (twenty junk tokens from anyone would
//! silence `denied_burst` for everyone for an hour). The header is read only from a peer in
//! the list, and only as far back as the proxies in it: each trusted hop appends the address
//! it received from, so the entries are walked from the right and the first one no trusted
//! proxy owns is the client. A client cannot make itself look like anyone by sending the
//! header itself: what it wrote is to the left of what the first trusted proxy appended.
//! An entry that is not an address ends the walk at the last trusted hop, as does a list of
//! trusted hops only.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// A network of trusted proxies, `10.0.0.0/8` or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Parses `ADDR` or `ADDR/PREFIX`; the message says what is wrong.
    pub fn parse(s: &str) -> Result<Net, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        if prefix == 0 {
            return Err(format!(
                "`{s}` trusts every address: anyone could name any client; list the balancers"
            ));
        }
        // Wider than any private range (`10.0.0.0/8`, `fc00::/7`) or a site's public IPv6
        // allocation: a list of two `/1`s trusts everyone as `/0` does.
        let unique_local = Net {
            addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)),
            prefix: 7,
        };
        let widest = match addr {
            IpAddr::V4(_) => 8,
            IpAddr::V6(_) if prefix >= 7 && unique_local.contains(addr) => 7,
            IpAddr::V6(_) => 32,
        };
        if prefix < widest {
            return Err(format!(
                "`{s}` trusts a network wider than /{widest}: anyone in it could name any \
                 client; list the balancers' own addresses or networks"
            ));
        }
        if addr.to_canonical() != addr {
            return Err(format!(
                "`{s}` is an IPv4-mapped IPv6 network: write it as the IPv4 network it maps"
            ));
        }
        let net = Net { addr, prefix };
        if net.masked(addr) != addr {
            return Err(format!(
                "`{s}` has bits set past its prefix (did you mean `{}/{prefix}`?)",
                net.masked(addr)
            ));
        }
        Ok(net)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        }
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }
}

/// The trusted proxies; empty: no header is ever read.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Net>);

impl TrustedProxies {
    pub fn new(nets: Vec<Net>) -> Self {
        TrustedProxies(nets)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client of a request that arrived from `peer` with these headers. A forwarded
    /// client's port is not known: it is given as 0.
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if !self.trusts(peer.ip()) {
            // One client, one address, whether it came over IPv4 or as IPv4-mapped IPv6.
            return SocketAddr::new(peer.ip().to_canonical(), peer.port());
        }
        // Split as bytes: what a client wrote (any byte a header may carry) is to the left of
        // what the trusted hops appended, and must not stop the walk before it reaches them.
        let mut hops: Vec<&[u8]> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            hops.extend(value.as_bytes().split(|&b| b == b','));
        }
        let mut client = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        for hop in hops.iter().rev() {
            let Some(ip) = std::str::from_utf8(hop).ok().and_then(hop_address) else {
                return client;
            };
            client = SocketAddr::new(ip.to_canonical(), 0);
            if !self.trusts(ip) {
                return client;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry's address: an address alone, or with the port some balancers
/// add (`203.0.113.9:51234`, `[2001:db8::1]:443`; Azure Application Gateway writes them so),
/// or an IPv6 address in brackets without one.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let n = Net::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let one = Net::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        assert!(
            Net::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        for widest in ["10.0.0.0/8", "fc00::/7", "2001:db8::/32"] {
            assert!(Net::parse(widest).is_ok(), "{widest}");
        }
        for bad in [
            "10.1.0.0/33",
            "10.1.0.1/16",
            "lb.internal",
            "10.1.0.0/",
            "fd00::/129",
            "0.0.0.0/0",
            "::/0",
            "0.0.0.0/1",
            "128.0.0.0/1",
            "10.0.0.0/7",
            "2000::/3",
            "2001:db8::/31",
            "fc00::/6",
            "::ffff:10.0.0.0/104",
        ] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
    }

    /// The client is the first hop from the right that no trusted proxy owns; a peer that is
    /// not trusted is the client whatever it sends; and a client cannot pose as another by
    /// writing the header itself.
    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        let t = TrustedProxies::new(vec![Net::parse("10.0.0.0/8").unwrap()]);
        let lb = at("10.0.0.5:40000");
        assert_eq!(
            t.client(lb, &headers(&["203.0.113.9"])),
            at("203.0.113.9:0")
        );
        // Through two trusted hops.
        assert_eq!(
            t.client(lb, &headers(&["203.0.113.9, 10.0.0.7"])),
            at("203.0.113.9:0")
        );
        // Spoofed: the client wrote `198.51.100.1`, the balancer appended the real one.
        assert_eq!(
            t.client(lb, &headers(&["198.51.100.1", "203.0.113.9"])),
            at("203.0.113.9:0")
        );
        // A byte no header text may hold, on the client's side: the balancer's entry stands.
        let mut odd = HeaderMap::new();
        odd.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"198.51.100.1\xff, 203.0.113.9").unwrap(),
        );
        assert_eq!(t.client(lb, &odd), at("203.0.113.9:0"));
        // Entries with the port a balancer adds, IPv4 and IPv6, name the client all the same
        // (and walk past a trusted hop written so).
        assert_eq!(
            t.client(lb, &headers(&["203.0.113.9:51234"])),
            at("203.0.113.9:0")
        );
        assert_eq!(
            t.client(lb, &headers(&["[2001:db8::1]:443, 10.0.0.7:80"])),
            at("[2001:db8::1]:0")
        );
        assert_eq!(
            t.client(lb, &headers(&["[2001:db8::1]"])),
            at("[2001:db8::1]:0")
        );
        // An IPv4-mapped peer is its IPv4 address.
        assert_eq!(
            t.client(at("[::ffff:203.0.113.50]:5555"), &HeaderMap::new()),
            at("203.0.113.50:5555")
        );
        // Not from a trusted peer: the header is ignored.
        let direct = at("203.0.113.50:5555");
        assert_eq!(t.client(direct, &headers(&["198.51.100.1"])), direct);
        // No header, garbage, or only trusted hops: the last trusted hop.
        assert_eq!(t.client(lb, &HeaderMap::new()), lb);
        assert_eq!(t.client(lb, &headers(&["not-an-ip"])), lb);
        assert_eq!(
            t.client(lb, &headers(&["junk, 10.0.0.7"])),
            at("10.0.0.7:0")
        );
        assert_eq!(t.client(lb, &headers(&["10.0.0.7"])), at("10.0.0.7:0"));
        // Nothing trusted: never read.
        assert_eq!(
            TrustedProxies::default().client(lb, &headers(&["203.0.113.9"])),
            lb
        );
    }
}
