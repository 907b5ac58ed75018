"""PLACEHOLDER (foundation commit): model conversion lands with the layers issue."""


def fuse(model, *, backend=None):
    raise NotImplementedError("gankern.fuse is not implemented yet")


def unfuse(model):
    raise NotImplementedError("gankern.unfuse is not implemented yet")
