# pragma version ~=0.4.3
"""
@title two_step_admin
@notice One admin per contract, handed over in two steps: the admin names a successor with
        transfer_admin(), and the successor takes over with accept_admin(). A typo'd or
        unreachable address therefore never becomes admin; until accepted, the old admin
        stays in charge and may name someone else (or the zero address, to cancel).
@dev A contract `initializes:` this module, calls __init__() (the deployer becomes admin) and
     exports transfer_admin, accept_admin, admin and pending_admin.
"""

event AdminTransferStarted:
    admin: indexed(address)
    pending_admin: indexed(address)

event AdminTransferred:
    admin: indexed(address)


admin: public(address)
pending_admin: public(address)


@deploy
def __init__():
    self.admin = msg.sender
    log AdminTransferred(admin=msg.sender)


@internal
@view
def _check_admin():
    assert msg.sender == self.admin, "admin: only admin"


@external
def transfer_admin(new_admin: address):
    """@notice Name `new_admin` as the next admin; the zero address cancels a pending one."""
    self._check_admin()
    assert new_admin != self.admin, "admin: already admin"
    self.pending_admin = new_admin
    log AdminTransferStarted(admin=msg.sender, pending_admin=new_admin)


@external
def accept_admin():
    """@notice Become admin; only the address the admin named may."""
    assert self.pending_admin != empty(address), "admin: no pending admin"
    assert msg.sender == self.pending_admin, "admin: only pending admin"
    self.admin = msg.sender
    self.pending_admin = empty(address)
    log AdminTransferred(admin=msg.sender)
