"""One op per file: kernel, launcher, op registration and public function, top to bottom."""
