// Package upgrade owns the upgrade between generations of molt masters:
// the dance, the handover on cloudflare/tableflip (and molt's own when
// tableflip's is spent), and the channel between the two masters.
//
// The dance is two state machines, OldSide (every master: it may start an
// upgrade, then serves alongside, commits, rolls back, retires or takes
// the service back) and NewSide (a master an upgrade started, until it is
// primary). Each is a pure core: Handle takes an Event and returns the
// Actions the master carries out; every change of state is one log line,
// event="upgrade.state". The package knows nothing of workers: the master
// reports them as numbers (Env) and starts or stops them when told.
//
// Every master owns exactly one Handover. Listeners travel through it as
// files under molt's own listener names, never under tableflip's address
// keys, so two ":0" listeners cannot collide and tableflip never unlinks a
// unix-socket path (molt owns unlinking, DESIGN §4). A master with no parent
// calls Ready as soon as it serves; a new master's Ready is the commit of an
// upgrade. tableflip allows one upgrade per process: once it has
// committed one (a master that took the service back since), the
// Handover starts new masters by molt's own handover (fresh.go), with
// the same files, commit and failures; nothing outside the package tells
// the two apart. tableflip's errors are classified once (UpgradeError),
// and the exit codes of molt have their one home here (exit.go).
package upgrade
