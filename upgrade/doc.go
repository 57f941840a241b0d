// Package upgrade is the handover between generations of molt masters, on
// cloudflare/tableflip.
//
// Every master owns exactly one Handover. Listeners travel through it as
// files under molt's own listener names, never under tableflip's address
// keys, so two ":0" listeners cannot collide and tableflip never unlinks a
// unix-socket path (molt owns unlinking, DESIGN §4). A master with no parent
// calls Ready as soon as it serves; a new master's Ready is the commit of an
// upgrade. The package knows nothing of workers.
package upgrade
