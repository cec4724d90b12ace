//! The network services a site runs: TFTP for boot loaders (DHCP and HTTP follow).
//! Each takes its socket from the caller and a shutdown token, so tests run them on
//! port 0 and the server on the site's address.

pub mod tftp;
