// Temporary entry point; replaced by the full CLI in this same change.
int main() { return 2; }
