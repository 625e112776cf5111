"""What runs inside a worker process, next to untrusted code.

Every module here is imported once by the zygote and then forked into each
worker, so it must stay small: the standard library and cloudpickle only,
no host secrets, no trust in anything a run left behind. The host side
lives in the ``sandbox`` package and treats everything a worker sends as
hostile.
"""
