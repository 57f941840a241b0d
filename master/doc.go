// Package master supervises one generation of molt: it holds the listen
// sockets (it never accepts on them) and preforks worker processes that
// accept on the same sockets.
//
// One goroutine, the loop in Run, owns all of a master's state; signal
// watchers, child waiters, the notify socket reader and timers only send
// it events. A master never reaps by wait4(-1) (each child is waited for
// by pid), never flips a shared socket's blocking mode, and never leaves a
// worker without a master: workers get their stop signal through
// Pdeathsig, and Go workers see EOF on the parent pipe.
package master
