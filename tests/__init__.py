"""botd's test suite: a package, so its shared modules are imported as ``tests.helpers``,
``tests.fakes`` and so on under any of pytest's import modes."""
