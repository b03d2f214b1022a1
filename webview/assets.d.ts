// esbuild bundles imported CSS into dist/webview.css; to TypeScript the import is a side effect only.
declare module '*.css';
