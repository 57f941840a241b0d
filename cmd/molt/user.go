package main

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// lookupCredential resolves --user and --group to the credential workers
// run with: the user's uid, the group's gid (the user's primary group when
// --group is not given) and the user's supplementary groups. Dropping
// privileges needs root; without it this is a clear error, not a worker
// that fails at exec. --group alone is refused: it would leave the
// workers root.
func lookupCredential(userName, groupName string) (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("--user/--group: running workers as another user needs root; molt runs as uid %d", os.Geteuid())
	}
	if userName == "" {
		// Only the gid would change: the workers would stay root, with
		// every capability, and could set any group they like.
		return nil, fmt.Errorf("--group %s without --user: the workers would still run as root, with every capability; give --user too (e.g. --user nobody --group %s)", groupName, groupName)
	}
	u, err := lookupUser(userName)
	if err != nil {
		return nil, fmt.Errorf("--user %s: %w", userName, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	if ids, err := u.GroupIds(); err == nil {
		for _, g := range ids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				cred.Groups = append(cred.Groups, uint32(n))
			}
		}
	}
	if groupName != "" {
		g, err := user.LookupGroup(groupName)
		if err != nil {
			if g, err = user.LookupGroupId(groupName); err != nil {
				return nil, fmt.Errorf("--group %s: no such group", groupName)
			}
		}
		gid, _ := strconv.ParseUint(g.Gid, 10, 32)
		cred.Gid = uint32(gid)
	}
	if len(cred.Groups) == 0 {
		cred.Groups = []uint32{cred.Gid} // never keep root's supplementary groups
	}
	return cred, nil
}

// lookupUser finds a user by name, or by uid.
func lookupUser(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if err == nil {
		return u, nil
	}
	if u, err2 := user.LookupId(name); err2 == nil {
		return u, nil
	}
	return nil, fmt.Errorf("no such user")
}
